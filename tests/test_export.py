"""Export to Hugging Face, judged by `transformers`: every combination of the model switches either loads there with
our logits, or is refused in one line that names the setting; and the exporter never destroys what it did not
write."""
import itertools
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from minigpt import GPT, ConfigError, GPTConfig
from minigpt.checkpoint import save_checkpoint
from minigpt.export import EXPORT_MARKER, save_hf_folder
from minigpt.export import main as export_main
from tokenizer import Tokenizer

from helpers import gpt2_style_tokenizer
from test_hf import TEXT, cli, one_line_error, reference

BLOCK = 16


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(TEXT * 20, vocab_size=320, progress=False, num_proc=1)


@pytest.fixture(autouse=True)
def quiet_transformers():
    """transformers logs a progress bar per load; the combination test loads 60 models."""
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    yield
    hf_logging.set_verbosity(level)
    hf_logging.enable_progress_bar()


def tiny_model(vocab_size: int, **shape) -> GPT:
    """A small model moved away from its initialisation, so that biases, norms and gains are not 0s and 1s (a map
    that dropped one would still agree at init)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab_size, block_size=BLOCK, n_layer=2, n_head=6, n_embd=48, **shape)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def checkpoint(folder: Path, tok: Tokenizer, **shape) -> GPT:
    model = tiny_model(tok.vocab_size, **shape)
    save_checkpoint(folder, model, tok, {"model": model.config.to_dict(), "train": {}, "step": 0})
    return model


# ---------------------------------------------------------------------------------- every switch, exact or refused
# The list of what must export exactly, written out independently of config.EXPORT_FORMATS: the settings
# each architecture takes (mlp here is the MLP together with its activation: gelu, gelu_tanh, relu2, swiglu).
ARCHITECTURES = {
    "GPT2LMHeadModel": dict(positions={"learned", "sinusoidal"}, norm={"layernorm"},
                            mlp={"gelu", "gelu_tanh", "relu2"}, qk_norm={False}, bias={True, False}),
    "MptForCausalLM": dict(positions={"alibi"}, norm={"layernorm"}, mlp={"gelu"}, qk_norm={False}, bias={False}),
    "LlamaForCausalLM": dict(positions={"rope"}, norm={"rmsnorm"}, mlp={"swiglu"}, qk_norm={False}, bias={False}),
    "Qwen3ForCausalLM": dict(positions={"rope"}, norm={"rmsnorm"}, mlp={"swiglu"}, qk_norm={True}, bias={False}),
}
# The longest input each declares: GPT-2 its position table, MPT any length (ALiBi runs beyond the training
# context), Llama and Qwen3 the training context (RoPE does not extrapolate; vLLM and llama.cpp serve this much).
DECLARED = {"GPT2LMHeadModel": {"n_positions": BLOCK}, "MptForCausalLM": {"max_seq_len": 65536},
            "LlamaForCausalLM": {"max_position_embeddings": BLOCK}, "Qwen3ForCausalLM": {"max_position_embeddings": BLOCK}}
# The flags that set each value (the tanh GELU is two: the gelu MLP, with the tanh activation)
FLAGS = {("norm", "layernorm"): ["--norm layernorm"], ("norm", "rmsnorm"): ["--norm rmsnorm"],
         ("mlp", "gelu"): ["--mlp gelu"], ("mlp", "relu2"): ["--mlp relu2"], ("mlp", "swiglu"): ["--mlp swiglu"],
         ("mlp", "gelu_tanh"): ["--mlp gelu", "--activation gelu_tanh"], ("qk_norm", True): ["--qk-norm"],
         ("qk_norm", False): ["--no-qk-norm"], ("bias", True): ["--bias"], ("bias", False): ["--no-bias"]}


def test_every_combination_exports_exactly_or_is_refused_in_one_line(tok, tmp_path):
    exported, refused = set(), 0
    for positions, norm, mlp, qk_norm, bias, tie in itertools.product(
            ("learned", "sinusoidal", "alibi", "rope"), ("layernorm", "rmsnorm"),
            ("gelu", "gelu_tanh", "relu2", "swiglu"), (False, True), (True, False), (True, False)):
        settings = dict(positions=positions, norm=norm, mlp=mlp, qk_norm=qk_norm, bias=bias)
        shape = dict(settings, mlp="gelu" if mlp == "gelu_tanh" else mlp, tie_weights=tie,
                     activation="gelu_tanh" if mlp == "gelu_tanh" else "gelu")
        model = tiny_model(tok.vocab_size, **shape)
        architecture = next((name for name, takes in ARCHITECTURES.items()
                             if all(settings[k] in allowed for k, allowed in takes.items())), None)
        folder = tmp_path / f"{len(exported)}-{refused}"
        if architecture is None:  # refused: one line, naming a setting that its architecture does not take
            with pytest.raises(ConfigError) as refusal:
                save_hf_folder(model, tok, folder)
            wrong = [flag for name, takes in ARCHITECTURES.items() if positions in takes["positions"]
                     for k, allowed in takes.items() if settings[k] not in allowed for flag in FLAGS[k, settings[k]]]
            message = str(refusal.value)
            assert "\n" not in message and any(message.startswith(f"cannot export a model trained with {flag}:")
                                               for flag in wrong), (settings, message)
            assert not folder.exists()
            refused += 1
            continue
        save_hf_folder(model, tok, folder)
        theirs = AutoModelForCausalLM.from_pretrained(folder).eval()
        assert type(theirs).__name__ == architecture, shape
        config = json.loads((folder / "config.json").read_text())
        assert {k: config[k] for k in ("n_positions", "max_seq_len", "max_position_embeddings") if k in config} == \
            DECLARED[architecture], shape
        # positions that take any length are exact beyond the training context too (transformers does not cut them
        # at the declared length)
        length = BLOCK if positions in ("learned", "sinusoidal") else 3 * BLOCK
        idx = torch.randint(0, tok.vocab_size, (2, length), generator=torch.Generator().manual_seed(len(exported)))
        with torch.no_grad():
            ours = model(idx)[0]
            assert (theirs(idx).logits - ours).abs().max() <= 1e-4, shape
            # and back: the exported folder is a pretrained model for GPT.from_pretrained and --init-from
            assert (GPT.from_pretrained(str(folder))(idx)[0] - ours).abs().max() <= 1e-5, shape
        exported.add((architecture, tie, bias, mlp, positions))
    # 24 GPT-2 (2 positions x 3 MLPs x bias x tying), 2 MPT, 2 Llama, 2 Qwen3 (tying); the other 226 refused
    assert len(exported) == 30 and refused == 4 * 2 * 4 * 2 * 2 * 2 - 30


def test_refusals_through_the_cli_name_the_setting(tok, tmp_path):
    """The wrong exports the issue found, each now one line that names what to change."""
    for shape, words in [(dict(positions="learned", qk_norm=True), ["--qk-norm", "GPT-2"]),
                         (dict(positions="rope"), ["--bias", "Llama", "--no-bias"]),
                         (dict(positions="learned", mlp="swiglu"), ["--mlp swiglu", "GPT-2"]),
                         (dict(positions="alibi", bias=False, norm="rmsnorm"), ["--norm rmsnorm", "MPT"])]:
        checkpoint(tmp_path / "out", tok, **shape)
        one_line_error(cli(export_main, str(tmp_path / "out"), str(tmp_path / "hf")), *words)
        assert not (tmp_path / "hf").exists()


# -------------------------------------------------------------------------------------------- the command line
@pytest.mark.parametrize("shape, architecture", [
    (dict(positions="learned"), "GPT2LMHeadModel"),
    (dict(positions="sinusoidal", tie_weights=False), "GPT2LMHeadModel"),
    (dict(positions="alibi", bias=False), "MptForCausalLM"),
    (dict(positions="rope", bias=False, norm="rmsnorm", mlp="swiglu", qk_norm=True), "Qwen3ForCausalLM"),
])
def test_export_loads_in_transformers_with_our_logits_and_ids(tok, tmp_path, shape, architecture):
    ours = checkpoint(tmp_path / "out", tok, **shape)
    result = cli(export_main, str(tmp_path / "out"), str(tmp_path / "hf"))
    assert result.returncode == 0, result.stderr
    theirs, their_tok = reference(tmp_path / "hf"), AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert type(theirs).__name__ == architecture
    ids = their_tok(TEXT)["input_ids"]
    assert ids == tok.encode_ordinary(TEXT)
    idx = torch.tensor([ids[:BLOCK]])
    with torch.no_grad():
        assert (theirs(idx).logits - ours(idx)[0]).abs().max() <= 1e-4
    if architecture != "GPT2LMHeadModel":  # ALiBi and RoPE compute any length, and so does the export
        prompt = idx[:, :4]
        expected = theirs.generate(prompt, max_new_tokens=3 * BLOCK, do_sample=False, pad_token_id=0,
                                   eos_token_id=None)
        assert torch.equal(ours.generate(prompt, 3 * BLOCK, temperature=0), expected)
        # read back, the training context is the block size again (not the declared reach)
        assert GPT.from_pretrained(str(tmp_path / "hf")).config == ours.config


def test_exported_end_of_text_id_is_the_tokenizers(tmp_path):
    """A tokenizer whose <|endoftext|> is id 0 (as `tokenizers` numbers special tokens first): the config's eos and
    bos, the generation config's, and transformers' tokenizer all agree with it."""
    trained = gpt2_style_tokenizer([TEXT] * 5, 300)
    trained.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_huggingface(tmp_path / "tokenizer.json")
    assert tok.eot_id == 0
    save_hf_folder(tiny_model(tok.vocab_size, positions="learned"), tok, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    their_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert config["eos_token_id"] == config["bos_token_id"] == generation["eos_token_id"] == 0
    assert their_tok.eos_token_id == their_tok.convert_tokens_to_ids("<|endoftext|>") == 0


# ------------------------------------------------------------------------------------------ nothing is lost
def listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_destination_is_never_the_checkpoint_around_or_inside_it(tok, tmp_path):
    run = tmp_path / "out" / "ft"
    checkpoint(run, tok, positions="learned")
    (run / "metrics.jsonl").write_text("{}\n")  # what a run folder holds besides the model
    (tmp_path / "link").symlink_to(run)
    before = listing(run)
    for destination, word in [(run, "is the checkpoint"), (run.parent, "holds the checkpoint"),
                              (tmp_path, "holds the checkpoint"), (run / "hf", "lies inside the checkpoint"),
                              (run / ".." / "ft", "is the checkpoint"), (tmp_path / "link", "is the checkpoint")]:
        one_line_error(cli(export_main, str(run), str(destination), "--overwrite"), word)
        assert listing(run) == before and sorted(p.name for p in tmp_path.iterdir()) == ["link", "out"]


def test_overwrite_replaces_only_an_earlier_export(tok, tmp_path):
    checkpoint(tmp_path / "out", tok, positions="learned")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    one_line_error(cli(export_main, str(tmp_path / "out"), str(junk)), "--overwrite")
    one_line_error(cli(export_main, str(tmp_path / "out"), str(junk), "--overwrite"), EXPORT_MARKER)
    assert listing(junk) == {"notes.txt": b"mine"}
    (tmp_path / "file").write_text("mine")
    one_line_error(cli(export_main, str(tmp_path / "out"), str(tmp_path / "file"), "--overwrite"), "not a folder")
    assert (tmp_path / "file").read_text() == "mine"

    hf = tmp_path / "hf"
    assert cli(export_main, str(tmp_path / "out"), str(hf)).returncode == 0
    one_line_error(cli(export_main, str(tmp_path / "out"), str(hf)), "--overwrite")  # not without it
    first = listing(hf)
    checkpoint(tmp_path / "out", tok, positions="learned", tie_weights=False)  # a new model to export over it
    assert cli(export_main, str(tmp_path / "out"), str(hf), "--overwrite").returncode == 0
    assert listing(hf).keys() == first.keys() and listing(hf) != first
    assert not reference(hf).config.tie_word_embeddings
    (hf / "README.md").write_text("a model card I wrote")
    one_line_error(cli(export_main, str(tmp_path / "out"), str(hf), "--overwrite"), "README.md")
    assert (hf / "README.md").read_text() == "a model card I wrote"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "hf", "junk", "out"]  # no staging left over


def test_paths_expand_the_home_folder(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    checkpoint(tmp_path / "my run", tok, positions="learned")
    result = cli(export_main, "~/my run", "~/hf out")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "hf out" / "model.safetensors").is_file() and not Path("~").exists()
