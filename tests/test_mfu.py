"""MFU: the formula against llm.c's published figure, the peak table matched on the names torch gives real GPUs,
--peak-tflops, and what a training run logs with and without a peak."""
import pytest
import torch

from minigpt import GPT, GPTConfig
from minigpt.checkpoint import load_model
from minigpt.mfu import PEAKS, choose_peak, find_peak, mfu
from minigpt.trainer import train

from helpers import records, tiny_config, write_corpus


def test_formula_is_model_flops_over_the_peak_of_all_gpus():
    assert mfu(1e9, 4e5, 1e15) == pytest.approx(0.4)
    assert mfu(1e9, 8e5, 1e15, num_gpus=2) == pytest.approx(0.4)  # tokens/s of the whole job, peak of each GPU


def test_gpt2_124m_at_llmc_speed_is_about_41_percent():
    """The issue's yardstick: llm.c's 8xH100 run trains GPT-2 124M at about 470K tokens/s per GPU, about 41 % MFU
    by PaLM's count (6 N + 12 L C T), which is what GPT.flops_per_token counts."""
    with torch.device("meta"):  # only the parameter count is needed: no memory, no initialisation
        model = GPT(GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768,
                              positions="learned"))
    n_matmul = 124_439_808 - 1024 * 768  # GPT-2 small's 124.4M weights but the position table: the token
    # embedding is a lookup, but the same matrix is the head's matmul
    assert model.flops_per_token(1024) == 6 * n_matmul + 12 * 12 * 768 * 1024
    peak = find_peak("NVIDIA H100 80GB HBM3").bf16 * 1e12
    assert 8 * 470e3 * model.flops_per_token(1024) / (8 * peak) == pytest.approx(0.41, abs=0.01)


@pytest.mark.parametrize("name, expected", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA H100 NVL", "H100 NVL"), ("NVIDIA H200", "H200 SXM"), ("NVIDIA H200 NVL", "H200 NVL"),
    ("NVIDIA GH200 480GB", "GH200"), ("NVIDIA B200", "B200"),
    ("NVIDIA A100-SXM4-80GB", "A100"), ("NVIDIA A100-SXM4-40GB", "A100"), ("NVIDIA A100-PCIE-40GB", "A100"),
    ("NVIDIA A100 80GB PCIe", "A100"), ("NVIDIA A10", "A10"), ("NVIDIA A10G", None), ("NVIDIA A30", "A30"),
    ("NVIDIA A40", "A40"), ("NVIDIA L4", "L4"), ("NVIDIA L40S", "L40S"), ("NVIDIA L40", "L40"),
    ("Tesla T4", "T4"), ("Tesla V100-SXM2-16GB", "V100 SXM2"), ("Tesla V100-SXM2-32GB", "V100 SXM2"),
    ("Tesla V100-PCIE-32GB", "V100 PCIe"), ("Tesla V100S-PCIE-32GB", "V100S PCIe"),
    ("NVIDIA GeForce RTX 3090", "RTX 3090"), ("NVIDIA GeForce RTX 3090 Ti", None),
    ("NVIDIA GeForce RTX 4090", "RTX 4090"), ("NVIDIA GeForce RTX 4090 D", None), ("NVIDIA GeForce RTX 3080", None),
    ("NVIDIA RTX A6000", "RTX A6000"), ("NVIDIA RTX 6000 Ada Generation", "RTX 6000 Ada"),
    ("AMD Instinct MI300X", None),
])
def test_device_names_as_torch_reports_them(name, expected):
    peak = find_peak(name)
    assert (peak.name if peak else None) == expected


def test_every_table_entry_is_reachable_and_dense():
    """Each pattern finds its own entry (no earlier pattern shadows it), and no rate is a sparse headline number:
    dense bfloat16 is at most 2.25 PFLOP/s (B200) and TF32 runs at half the 16-bit rate on every listed GPU."""
    for pattern, peak in PEAKS:
        example = pattern.replace(r"\b", "").replace(".*", " ").split("(?!")[0].strip()
        assert find_peak(example) is peak, pattern
        if peak.tf32 is not None:
            assert peak.tf32 == pytest.approx(peak.fp16 / 2, rel=0.02), peak
        assert peak.fp16 <= 2250 and peak.fp32 <= peak.fp16


@pytest.fixture
def gpu_named(monkeypatch):
    def name(device_name: str) -> torch.device:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: device_name)
        return torch.device("cuda", 0)
    return name


def test_the_peak_follows_the_dtype(gpu_named):
    h100 = gpu_named("NVIDIA H100 80GB HBM3")
    assert choose_peak(h100, torch.bfloat16).flops == pytest.approx(989.4e12)
    assert choose_peak(h100, torch.float16).flops == pytest.approx(989.4e12)
    assert choose_peak(h100, None, tf32=True).flops == pytest.approx(494.7e12)
    assert choose_peak(h100, None, tf32=False).flops == pytest.approx(66.9e12)
    assert "H100 SXM" in choose_peak(h100, torch.bfloat16).reason
    t4 = gpu_named("Tesla T4")
    assert choose_peak(t4, torch.float16).flops == pytest.approx(65e12)
    assert choose_peak(t4, None, tf32=True).flops == pytest.approx(8.1e12)  # no TF32 before Ampere: float32 runs at FP32's rate


def test_unknown_gpu_or_cpu_has_no_peak_and_says_why(gpu_named):
    unknown = choose_peak(gpu_named("NVIDIA GeForce GTX 1080"), torch.float16)
    assert unknown.flops is None and "GTX 1080" in unknown.reason and "--peak-tflops" in unknown.reason
    cpu = choose_peak(torch.device("cpu"), None)
    assert cpu.flops is None and "cpu" in cpu.reason and "--peak-tflops" in cpu.reason


def test_the_override_wins_everywhere(gpu_named):
    assert choose_peak(gpu_named("NVIDIA H100 80GB HBM3"), torch.bfloat16, peak_tflops=500).flops == pytest.approx(500e12)
    assert choose_peak(torch.device("cpu"), None, peak_tflops=0.5).flops == pytest.approx(0.5e12)


def test_a_run_logs_mfu_on_every_train_line_from_its_own_rate(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus.txt", sentences=300)
    cfg = tiny_config(corpus, tmp_path / "cache", tmp_path / "out", max_iters=4, eval_interval=4, eval_iters=1,
                      peak_tflops=0.01)
    out = train(cfg)
    assert "mfu: against --peak-tflops 0.01" in capsys.readouterr().out
    flops = load_model(out)[0].flops_per_token(cfg.model.block_size)
    lines = records(out, "train")
    assert len(lines) == 4
    for line in lines:
        assert line["mfu"] == pytest.approx(flops * line["tokens_per_sec"] / 0.01e12)


def test_a_cpu_run_without_a_peak_logs_no_mfu_and_says_why(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus.txt", sentences=300)
    out = train(tiny_config(corpus, tmp_path / "cache", tmp_path / "out", max_iters=2, eval_interval=2,
                            eval_iters=1))
    assert "mfu: not reported on cpu" in capsys.readouterr().out
    assert all("mfu" not in line for line in records(out, "train"))
