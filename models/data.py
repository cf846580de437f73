"""Labelled text datasets: the shipped ones by name, or the user's own JSONL/CSV file.

The shipped sets live outside the repository. Their folder is ``--data-dir`` if given, else
``$SINGLEPASS_DATA``, else the first ``shared/data`` found beside the working directory or
beside one of its parents (a checkout at /work/main reads /work/shared/data); it never depends
on where the package is installed. Every row is checked: a missing column, non-string or empty
text, or an unknown label is an error naming the file and row.

Response sets (``DatasetSpec.reads == "response"``: beavertails, gptfuzz, saferlhf,
wildguardmix_response) label a model's *response* to a prompt: each row carries ``prompt`` and
``response`` in ``columns`` (both checked like ``text``: a missing, non-string or empty one is
an error naming the file and row), ``texts`` is their "User: ...\nAssistant: ..." join (the key
mixtures find overlaps on and the cache digests), and ``reads`` is "response", so the cache
encodes the serving view of the pair (models/prompts.py ``encode_responses``). A user's file
whose every row has ``prompt`` and ``response`` is a response set too (``load_file``; labels 0/1
or safe/unsafe), e.g. the model's own answers that ``singlepass answer`` writes (models/answers.py).
"""

from __future__ import annotations

import csv
import gzip
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from singlepass.errors import SinglepassError

DATA_ENV = "SINGLEPASS_DATA"
SHARED_DATA = Path("shared") / "data"  # looked for beside the working directory and its parents
VALIDATION_FRACTION = 0.1  # carved from train, stratified, where no official split exists
ONE_FILE_PARTITION = (("train", 0.7), ("validation", 0.1), ("test", 0.2))  # sets shipped as one file
PARTITION_SEED = 20261204


@dataclass(frozen=True)
class DatasetSpec:
    folder: str
    label_names: tuple[str, ...]
    splits: tuple[str, ...]  # official splits on disk
    task: str  # "safety" (F1 of the positive class) or "classification" (accuracy)
    # Named splits carved from one file on disk (``partition_of``): {split: fraction}, seeded and
    # stratified by label (and ``stratify_by``, a boolean column) so the parts are disjoint.
    partition: dict[str, float] = field(default_factory=dict)
    partition_of: str = "test"
    stratify_by: str | None = None
    # "prompt": a probe reads the prompt; "response": it reads the response tokens after the prompt.
    reads: str = "prompt"
    # Response sets: the column holding the prompt ("text" is the file's text) and the one holding
    # the response label (None: the file's "label"; rows where it is null are not in the set).
    prompt_column: str = "prompt"
    label_column: str | None = None


# WildGuardTest's parts: train, validation and an untouched part only ever tested on, stratified
# by label x adversarial; shared by its prompt and response views. The cuts are cumulative per
# stratum (``partition_rows``), so test_untouched is the same 70% it was when the first 30% was all
# validation: train and validation split that 30% 2:1.
WILDGUARD_PARTS = {"train": 0.2, "validation": 0.1, "test_untouched": 0.7}

DATASETS: dict[str, DatasetSpec] = {
    "toxicchat": DatasetSpec("toxicchat", ("non-toxic", "toxic"), ("train", "test"), "safety"),
    # WildGuardTest: train and validation parts and an untouched part that is only ever tested on
    # (WILDGUARD_PARTS); "test" stays the whole official file.
    "wildguardmix": DatasetSpec(
        "wildguardmix", ("unharmful", "harmful"), ("test",), "safety", WILDGUARD_PARTS, stratify_by="adversarial"
    ),
    "sst2": DatasetSpec("sst2", ("negative", "positive"), ("train", "validation", "test"), "classification"),
    "imdb": DatasetSpec("imdb", ("negative", "positive"), ("train", "test"), "classification"),
    "emotion": DatasetSpec(
        "emotion",
        ("sadness", "joy", "love", "anger", "fear", "surprise"),
        ("train", "validation", "test"),
        "classification",
    ),
    # One-sided prompt sets (all harmful or all benign) shipped as one file: carved 70/10/20.
    "advbench": DatasetSpec("advbench", ("safe", "unsafe"), ("test",), "safety", dict(ONE_FILE_PARTITION)),
    "harmbench": DatasetSpec("harmbench", ("safe", "unsafe"), ("train", "test"), "safety"),
    "strongreject": DatasetSpec("strongreject", ("safe", "unsafe"), ("test",), "safety", dict(ONE_FILE_PARTITION)),
    "alpaca_noinput": DatasetSpec("alpaca_noinput", ("safe", "unsafe"), ("test",), "safety", dict(ONE_FILE_PARTITION)),
    # Response sets (label 1 = harmful response). BeaverTails' three files are a seeded 70/10/20
    # split of 30k_test; GPTFuzz's validation is carved from train; SafeRLHF is test only (its
    # pairs shared with BeaverTails removed, an out-of-distribution test for it).
    "beavertails": DatasetSpec(
        "beavertails", ("safe", "unsafe"), ("train", "validation", "test"), "safety", reads="response"
    ),
    "gptfuzz": DatasetSpec("gptfuzz", ("safe", "unsafe"), ("train", "test"), "safety", reads="response"),
    "saferlhf": DatasetSpec("saferlhf", ("safe", "unsafe"), ("test",), "safety", reads="response"),
    # WildGuardTest's rows with a response_harm_label (1,689 of 1,699; 282 harmful). Its validation
    # and test_untouched are wildguardmix's own parts (cut on the whole file, as there) restricted
    # to these rows, so the prompt and response views share one held-out part.
    "wildguardmix_response": DatasetSpec(
        "wildguardmix",
        ("unharmful", "harmful"),
        ("test",),
        "safety",
        WILDGUARD_PARTS,
        stratify_by="adversarial",
        reads="response",
        prompt_column="text",
        label_column="response_harm_label",
    ),
}
# Splits no training path may read (models/train.py and models/mixture.py refuse them).
PROTECTED_SPLITS = frozenset({"test_untouched"})
# Pseudo-splits: subsets of an official split selected by a boolean column.
SUBSET_SPLITS = {"test_human": ("test", "human_annotation")}  # ToxicChat's human-annotated rows


@dataclass
class Dataset:
    name: str
    split: str
    texts: list[str]
    labels: np.ndarray  # int64 [N]
    label_names: tuple[str, ...]
    task: str = "classification"
    source: str = ""
    columns: dict[str, list] = field(default_factory=dict)  # extra columns, row-aligned
    reads: str = "prompt"  # "response": rows are (columns["prompt"], columns["response"]) pairs

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx) -> "Dataset":
        idx = np.asarray(idx, dtype=np.int64)
        return Dataset(
            self.name,
            self.split,
            [self.texts[i] for i in idx],
            self.labels[idx],
            self.label_names,
            self.task,
            self.source,
            {k: [v[i] for i in idx] for k, v in self.columns.items()},
            self.reads,
        )


def find_shared_data(start: str | os.PathLike | None = None) -> Path | None:
    """The first ``shared/data`` folder beside ``start`` (default: the working directory) or
    beside one of its parents, nearest first; None if there is none."""
    here = Path.cwd() if start is None else Path(start).absolute()
    for folder in (here, *here.parents):
        candidate = folder.parent / SHARED_DATA
        if candidate.is_dir():
            return candidate
    return None


def data_dir(override: str | os.PathLike | None = None) -> Path:
    """The datasets folder: ``override`` (--data-dir), else $SINGLEPASS_DATA, else the nearest
    shared/data beside the working directory or a folder above it."""
    if override:
        return Path(override)
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV])
    found = find_shared_data()
    if found is None:
        raise SinglepassError(
            f"no datasets folder: --data-dir is not given, ${DATA_ENV} is not set and no "
            f"{SHARED_DATA} folder lies beside {Path.cwd()} or a folder above it; "
            f"set ${DATA_ENV} or pass --data-dir with the folder holding {', '.join(DATASETS)}"
        )
    return found


def _read_rows(path: Path) -> list[dict]:
    """Rows of a .jsonl[.gz] or .csv[.gz] file as dicts (1-based row numbers in errors)."""
    opener = gzip.open if path.suffix == ".gz" else open
    stem = path.name[:-3] if path.suffix == ".gz" else path.name
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            if stem.endswith(".csv"):
                return list(csv.DictReader(f))
            if stem.endswith((".jsonl", ".json")):
                rows = []
                for i, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise SinglepassError(f"{path}: row {i} is not valid JSON ({e.msg})") from None
                return rows
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise SinglepassError(f"{path}: cannot read ({e})") from None
    raise SinglepassError(
        f"{path}: unsupported file type; use .jsonl, .jsonl.gz, .csv or .csv.gz with 'text' and 'label' columns"
    )


def _check_rows(
    rows: list[dict], path: Path, label_names: tuple[str, ...] | None
) -> tuple[list[str], np.ndarray, tuple[str, ...]]:
    """Validate text/label columns; map labels (ints or names) to class indices."""
    if not rows:
        raise SinglepassError(f"{path}: no rows")
    texts, raw = [], []
    for i, r in enumerate(rows, 1):
        for col in ("text", "label"):
            if col not in r or r[col] is None:
                raise SinglepassError(f"{path}: row {i} has no '{col}' column (columns: {', '.join(map(str, r))})")
        t = r["text"]
        if not isinstance(t, str):
            raise SinglepassError(f"{path}: row {i}: 'text' is {type(t).__name__}, not a string")
        if not t.strip():
            raise SinglepassError(f"{path}: row {i}: 'text' is empty")
        texts.append(t)
        raw.append(r["label"])

    def as_int(v):
        if isinstance(v, bool):
            return None
        if isinstance(v, int):
            return v
        if isinstance(v, str) and v.strip().lstrip("-").isdigit():
            return int(v)
        return None

    ints = [as_int(v) for v in raw]
    if all(v is not None for v in ints):  # integer labels
        n = len(label_names) if label_names else max(ints) + 1
        names = label_names or tuple(str(k) for k in range(n))
        for i, v in enumerate(ints, 1):
            if not 0 <= v < n:
                raise SinglepassError(f"{path}: row {i}: unknown label {v} (expected 0..{n - 1}: {', '.join(names)})")
        return texts, np.asarray(ints, dtype=np.int64), names
    names = label_names or tuple(sorted({str(v) for v in raw}))
    index = {n: k for k, n in enumerate(names)}
    labels = []
    for i, v in enumerate(raw, 1):
        if str(v) not in index:
            raise SinglepassError(f"{path}: row {i}: unknown label {v!r} (expected one of: {', '.join(names)})")
        labels.append(index[str(v)])
    return texts, np.asarray(labels, dtype=np.int64), names


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(keep, held_out) row indices, stratified by label and seeded."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    keep, held = train_test_split(idx, test_size=fraction, random_state=seed, stratify=labels)
    return np.sort(keep), np.sort(held)


def partition_rows(strata: np.ndarray, fractions: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    """Disjoint, seeded row indices per named part, stratified: each stratum's rows are shuffled
    and cut at the cumulative fractions (rounded), so every part keeps the strata's proportions."""
    # cuts rounded to 12 places: 0.2 + 0.1 must cut where 0.3 does (a half-row stratum rounds alike)
    names, cuts = list(fractions), np.round(np.cumsum(list(fractions.values())), 12)
    if any(f <= 0 for f in fractions.values()) or abs(cuts[-1] - 1.0) > 1e-9:
        raise ValueError(f"partition fractions must be positive and sum to 1, not {fractions}")
    rng = np.random.default_rng(seed)
    parts: dict[str, list[int]] = {n: [] for n in names}
    for value in np.unique(strata):
        rows = rng.permutation(np.flatnonzero(strata == value))
        bounds = [0, *np.round(cuts * len(rows)).astype(int)]
        for n, a, b in zip(names, bounds[:-1], bounds[1:]):
            parts[n].extend(rows[a:b].tolist())
    return {n: np.sort(np.asarray(v, dtype=np.int64)) for n, v in parts.items()}


def available_splits(name: str) -> list[str]:
    """Every split ``load_dataset`` accepts for a shipped dataset."""
    spec = DATASETS[name]
    out = set(spec.splits) | set(spec.partition)
    if "train" in spec.splits:
        out.add("validation")
    out |= {sub for sub, (base, _) in SUBSET_SPLITS.items() if name == "toxicchat" and base in out}
    return sorted(out)


def load_partition(spec: DatasetSpec, folder: Path, name: str, split: str) -> "Dataset":
    """One named part of ``spec.partition`` (see DatasetSpec)."""
    ds = load_file(folder / f"{spec.partition_of}.jsonl.gz", spec.label_names, name, split, detect_response=False)
    strata = ds.labels.copy()
    if spec.stratify_by is not None:
        strata = strata * 2 + np.asarray([bool(v) for v in ds.columns[spec.stratify_by]], dtype=np.int64)
    ds = ds.subset(partition_rows(strata, spec.partition, PARTITION_SEED)[split])
    ds.split = split
    return ds


def pair_text(prompt: str, response: str) -> str:
    """The one text of a (prompt, response) pair: overlap keys, the guard's view, answer files."""
    return f"User: {prompt}\nAssistant: {response}"


def response_view(ds: Dataset, spec: DatasetSpec, path: Path) -> Dataset:
    """The rows of ``ds`` (loaded from ``path``) as a response set: labels from
    ``spec.label_column`` (rows where it is null dropped), prompt and response checked and kept
    in ``columns``, ``texts`` their "User: ...\nAssistant: ..." join."""
    if spec.label_column is not None:
        if spec.label_column not in ds.columns:
            raise SinglepassError(f"{path}: row 1 has no '{spec.label_column}' column (the response label)")
        ds = ds.subset([i for i, v in enumerate(ds.columns[spec.label_column]) if v is not None])
        index = {n: k for k, n in enumerate(spec.label_names)}
        labels = []
        for v, row in zip(ds.columns[spec.label_column], ds.columns["row"]):
            if str(v) not in index:
                raise SinglepassError(
                    f"{path}: row {row + 1}: unknown {spec.label_column} {v!r} (expected one of: {', '.join(index)})"
                )
            labels.append(index[str(v)])
        ds.labels = np.asarray(labels, dtype=np.int64)
    pairs = {}
    for col, name in ((spec.prompt_column, "prompt"), ("response", "response")):
        values = ds.texts if col == "text" else ds.columns.get(col, [None] * len(ds))
        for v, row in zip(values, ds.columns["row"]):
            if not isinstance(v, str) or not v.strip():
                what = "is missing" if v is None else "is empty" if isinstance(v, str) else f"is {type(v).__name__}"
                role = "" if col == name else f" (the {name})"
                raise SinglepassError(
                    f"{path}: row {row + 1}: '{col}'{role} {what}; a response set needs a prompt and a response"
                )
        pairs[name] = list(values)
    ds.columns.update(pairs)
    ds.texts = [pair_text(p, r) for p, r in zip(pairs["prompt"], pairs["response"])]
    ds.reads = "response"
    return ds


# A user file whose every row has "prompt" and "response" is a response set (label 1 = harmful).
FILE_RESPONSE_SPEC = DatasetSpec("", ("safe", "unsafe"), (), "safety", reads="response")


def is_response_rows(rows: list[dict]) -> bool:
    """Every row carries a ``prompt`` and a ``response`` field: the rows of a response set."""
    return bool(rows) and all(isinstance(r, dict) and "prompt" in r and "response" in r for r in rows)


def is_response_file(path: str | os.PathLike) -> bool:
    """A readable file whose every row has ``prompt`` and ``response`` (``load_file`` reads it
    as a response set)."""
    return is_response_rows(_read_rows(Path(path)))


def load_file(
    path: str | os.PathLike,
    label_names: tuple[str, ...] | None = None,
    name: str | None = None,
    split: str = "file",
    detect_response: bool = True,
) -> Dataset:
    """A labelled file. With ``detect_response`` (a user's file), one whose every row has
    ``prompt`` and ``response`` is read as a response set (``response_view``): a safety set
    labelled 0/1 or safe/unsafe, ``text`` optional (the pair's join is used either way)."""
    path = Path(path)
    if not path.is_file():
        raise SinglepassError(f"{path}: no such file")
    rows = _read_rows(path)
    response = detect_response and is_response_rows(rows)
    if response:
        label_names = label_names or FILE_RESPONSE_SPEC.label_names
        # a placeholder text where a row has none; response_view checks the pair itself
        rows = [r if r.get("text") is not None else {**r, "text": pair_text(r["prompt"], r["response"])} for r in rows]
    texts, labels, names = _check_rows(rows, path, label_names)
    extra = {k: [r.get(k) for r in rows] for k in rows[0] if k not in ("text", "label")}
    extra["row"] = list(range(len(rows)))  # 0-based row in the file, kept through subsets
    task = "safety" if len(names) == 2 else "classification"
    ds = Dataset(name or path.name, split, texts, labels, names, task, str(path), extra)
    return response_view(ds, FILE_RESPONSE_SPEC, path) if response else ds


def load_dataset(
    name: str, split: str, data_dir_override: str | None = None, seed: int = 0, limit: int | None = None
) -> Dataset:
    """A shipped dataset by name, or a user file by path (``split`` then is just a tag).

    Splits: the official ones; ``validation`` where none exists is a stratified
    VALIDATION_FRACTION of train (seeded) and ``train`` is then the rest; ToxicChat also
    has ``test_human`` (the human-annotated test rows the paper reports). Sets shipped as one
    file are carved by ``DatasetSpec.partition`` (advbench, strongreject, alpaca_noinput:
    train/validation/test 70/10/20; wildguardmix: train/validation/test_untouched 20/10/70, besides
    its whole official ``test``). ``limit`` takes a seeded stratified subset.
    """
    if name not in DATASETS:
        if Path(name).suffix in (".jsonl", ".gz", ".csv", ".json") or Path(name).exists():
            ds = load_file(name, split=split)
        else:
            raise SinglepassError(
                f"unknown dataset {name!r}: use one of {', '.join(DATASETS)} "
                "or a path to a .jsonl/.csv file with 'text' and 'label' columns (a response set: "
                "'prompt', 'response' and 'label')"
            )
    else:
        spec = DATASETS[name]
        root = data_dir(data_dir_override)
        folder = root / spec.folder
        if not folder.is_dir():
            raise SinglepassError(
                f"dataset folder {folder} not found: set --data-dir or "
                f"SINGLEPASS_DATA to the folder holding {', '.join(DATASETS)}"
            )
        if split not in available_splits(name):
            raise SinglepassError(
                f"dataset {name!r} has no split {split!r} (available: {', '.join(available_splits(name))})"
            )
        base, column = SUBSET_SPLITS.get(split, (split, None))
        carve = base in ("train", "validation") and "validation" not in spec.splits and split not in spec.partition
        path = folder / f"{spec.partition_of if split in spec.partition else 'train' if carve else base}.jsonl.gz"
        if split in spec.partition:
            ds = load_partition(spec, folder, name, split)
        else:
            ds = load_file(path, spec.label_names, name, split, detect_response=False)
        if spec.reads == "response":
            ds = response_view(ds, spec, path)
        ds.task = spec.task
        if carve:
            keep, held = stratified_split(ds.labels, VALIDATION_FRACTION, seed=0)
            ds = ds.subset(held if base == "validation" else keep)
            ds.split = split
        if column is not None:
            if column not in ds.columns:
                raise SinglepassError(f"dataset {name!r} has no {column!r} column for split {split!r}")
            ds = ds.subset([i for i, v in enumerate(ds.columns[column]) if v])
            ds.split = split
    return limit_rows(ds, limit, seed)


def limit_rows(ds: Dataset, limit: int | None, seed: int, balanced: bool = False) -> Dataset:
    """A seeded, stratified subset of at most ``limit`` rows (``ds`` itself when it is no larger).

    ``balanced`` (``--balance-classes``): equal shares of the classes instead of their proportions,
    a class with fewer rows than its share kept whole and the rest shared by the others (a 7%-toxic
    source capped at 800 rows keeps all its toxic rows, not 58 of them)."""
    if limit is None or limit >= len(ds):
        return ds
    if limit <= 0:
        raise SinglepassError(f"--limit must be positive, got {limit}")
    if balanced:
        rng = np.random.default_rng(seed)
        by_class = sorted((rng.permutation(np.flatnonzero(ds.labels == c)) for c in np.unique(ds.labels)), key=len)
        take, left = [], limit
        for i, rows in enumerate(by_class):  # smallest class first: what it cannot use goes to the next
            n = min(len(rows), left // (len(by_class) - i))
            take.append(rows[:n])
            left -= n
        return ds.subset(np.sort(np.concatenate(take)))
    counts = np.bincount(ds.labels)
    classes = int((counts > 0).sum())
    if min(limit, len(ds) - limit) >= classes and counts[counts > 0].min() >= 2:  # sklearn's stratified split
        _, idx = stratified_split(ds.labels, limit / len(ds), seed)
        idx = idx[:limit]
    else:
        idx = np.sort(np.random.default_rng(seed).choice(len(ds), limit, replace=False))
    return ds.subset(idx)


def describe(ds: Dataset) -> str:
    counts = np.bincount(ds.labels, minlength=len(ds.label_names))
    parts = ", ".join(f"{n}={c}" for n, c in zip(ds.label_names, counts))
    return f"{ds.name}/{ds.split}: {len(ds)} rows ({parts})"
