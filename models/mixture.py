"""Safety training on a mixture of sources: one label space, per-source weights, no overlaps.

``--dataset toxicchat:2,advbench,harmbench,strongreject,alpaca_noinput`` names the sources, each
with an optional weight (default 1). Every source is a shipped binary safety set whose class 1
is the harmful one; its labels are mapped onto ``LABELS`` (safe / unsafe), so the one-sided sets
(advbench, harmbench, strongreject: all unsafe; alpaca_noinput: all safe) join the mixed ones
(toxicchat, wildguardmix).

Each source contributes its ``train``, ``validation`` and test parts (``parts``): WildGuardTest's
are its ``train`` 20%, ``validation`` 10% and ``test_untouched`` 70% (only ever tested on).
Overlaps are removed on normalised text (``normalise``: NFKC, whitespace collapsed, case-folded):
a training row whose text is in any source's validation or test part
(or in WildGuardTest's ``test_untouched``, even when wildguardmix is not in the mixture) is
dropped, a validation row whose text is in any test part is dropped, and repeats inside the
training (or validation) rows are kept once, the first in the order the sources are named.
The same text labelled safe in one place and unsafe in another is an error naming both.

Weights: a source's weight multiplies the loss of each of its training rows (so ``toxicchat:2``
counts as if every ToxicChat row were sampled twice as often; 1 keeps the natural proportions);
the weights are stored per row (``columns["mixture_weight"]``, mean 1) and the class balancing of the loss
(``class_weight=balanced``) balances the *weighted* class totals (models/fit.py).

Response sets (beavertails, gptfuzz, saferlhf, wildguardmix_response) mix the same way, with each
other only (a prompt set and a response set in one mixture is an error): overlaps are found on
the normalised (prompt, response) pair, and a set with no validation part (saferlhf) is a
test-only source. A response *file* (every row with ``prompt`` and ``response``, e.g. the model's
own benign answers from ``singlepass answer``) is a source too, named by its path, optionally
with a weight (``beavertails,gptfuzz,/data/answers.jsonl.gz:0.5``: the part after the last ':'
is a weight only where it is a number): its ``train`` and ``validation`` parts are a seeded,
stratified VALIDATION_FRACTION carve of its rows (as for a set without a validation split), it
has no test part, and it is shown (and reported) by its file name.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from singlepass.errors import SinglepassError
from singlepass.models.data import (
    DATASETS,
    PROTECTED_SPLITS,
    VALIDATION_FRACTION,
    Dataset,
    available_splits,
    is_response_file,
    limit_rows,
    load_dataset,
    load_file,
    stratified_split,
)

LABELS = ("safe", "unsafe")
_WEIGHTED = re.compile(r"^[A-Za-z0-9_]+:[^/\\]+$")


@dataclass(frozen=True)
class Source:
    name: str  # a shipped set's name, or a file source's file name
    weight: float = 1.0
    path: str | None = None  # a file source: the response file, as given

    @property
    def reads(self) -> str:
        return "response" if self.path is not None else DATASETS[self.name].reads


@dataclass
class Mixture:
    sources: list[Source]
    train: Dataset
    validation: Dataset
    report: dict = field(default_factory=dict)  # per source: rows kept and dropped, weight


def is_mixture(text: str) -> bool:
    """A comma-separated list of sources, or one source with a weight (``name:2``, or an
    existing file's ``path:2``); never an existing file."""
    if Path(text).exists():
        return False
    head, sep, tail = text.strip().rpartition(":")
    return "," in text or bool(_WEIGHTED.match(text.strip())) or bool(sep and _number(tail) and Path(head).is_file())


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def safety_sources() -> list[str]:
    return [n for n, s in DATASETS.items() if s.task == "safety" and len(s.label_names) == 2]


def split_source(item: str, text: str) -> tuple[str, str | None, str]:
    """One ``--dataset`` item -> (name, path or None, weight text): a shipped set's ``name`` or
    ``name:w``, or an existing response file's ``path`` or ``path:w`` (a path may hold ':'; the
    part after the last one is a weight only where it is a number)."""
    item = item.strip()
    head, sep, tail = item.rpartition(":")
    name, weight = (head.strip(), tail) if sep and _number(tail) else (item, "")
    if name in safety_sources():
        return name, None, weight
    if name and Path(name).is_file():
        path = Path(name)
        if not is_response_file(path):
            raise SinglepassError(
                f"mixture source {name!r}: a file in a mixture must be a response set (every row with "
                "'prompt' and 'response'); name shipped prompt sets by their names"
            )
        return path.name, name, weight
    base, sep, weight = item.partition(":")  # a shipped set with a weight that is not a number
    if sep and base.strip() in safety_sources():
        return base.strip(), None, weight
    raise SinglepassError(
        f"unknown mixture source {item!r} in --dataset {text!r}: use safety sets from "
        f"{', '.join(safety_sources())} or response files (every row with 'prompt' and 'response'), "
        "each optionally with a weight (name:2)"
    )


def parse_sources(text: str) -> list[Source]:
    """``a:2,b,c:0.5`` -> [Source("a", 2.0), Source("b", 1.0), Source("c", 0.5)];
    ``beavertails,/x/answers.jsonl.gz:2`` -> [..., Source("answers.jsonl.gz", 2.0, "/x/answers.jsonl.gz")]."""
    out: list[Source] = []
    for item in text.split(","):
        name, path, weight = split_source(item, text)
        try:
            w = float(weight) if weight.strip() else 1.0
        except ValueError:
            raise SinglepassError(f"mixture source {name!r}: weight {weight!r} is not a number") from None
        if not np.isfinite(w) or w <= 0:
            raise SinglepassError(f"mixture source {name!r}: weight must be a positive number, not {weight!r}")
        if any(s.name == name for s in out):
            raise SinglepassError(
                f"mixture source {name!r} is named twice in --dataset {text!r}"
                + (" (sources are named by their file name: rename one file)" if path else "")
            )
        out.append(Source(name, w, path))
    reads = {s.reads for s in out}
    if len(reads) > 1:
        by = {r: [s.name for s in out if s.reads == r] for r in sorted(reads)}
        raise SinglepassError(
            f"--dataset {text!r} mixes prompt sets ({', '.join(by['prompt'])}) with response sets "
            f"({', '.join(by['response'])}): a probe reads either the prompt or the response; mix one kind"
        )
    return out


def normalise(text: str) -> str:
    """The key overlaps are found on: NFKC, whitespace runs collapsed, stripped, case-folded."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text)).strip().casefold()


def held_out_split(name: str) -> str:
    """A source's held-out test part: ``test_untouched`` where one exists, else ``test``."""
    splits = available_splits(name)
    return next((s for s in splits if s in PROTECTED_SPLITS), "test")


def parts(name: str) -> dict[str, str | None]:
    """{part: split} of a source in a mixture (``train`` / ``validation`` None where it has none)."""
    splits = available_splits(name)
    return {
        "train": "train" if "train" in splits else None,
        "validation": "validation" if "validation" in splits else None,
        "test": held_out_split(name),
    }


def to_safety(ds: Dataset) -> Dataset:
    """The same rows under LABELS (class 1 of every shipped safety set is the harmful one)."""
    if ds.task != "safety" or len(ds.label_names) != 2:
        raise SinglepassError(f"{ds.name} is not a binary safety set (labels {', '.join(ds.label_names)})")
    out = ds.subset(np.arange(len(ds)))
    out.label_names = LABELS
    out.columns["mixture_source"] = [ds.name] * len(ds)
    out.columns["mixture_split"] = [ds.split] * len(ds)
    return out


def check_conflicts(datasets: list[Dataset]) -> None:
    """The same normalised text may not be safe in one row and unsafe in another."""
    seen: dict[str, tuple[int, str]] = {}
    for ds in datasets:
        for text, label in zip(ds.texts, ds.labels.tolist()):
            key = normalise(text)
            where = f"{ds.name}/{ds.split}"
            if key in seen and seen[key][0] != label:
                first_label, first_where = seen[key]
                raise SinglepassError(
                    f"conflicting labels for the same text: {first_where} has it as {LABELS[first_label]}, "
                    f"{where} as {LABELS[label]} ({text[:80]!r}); drop one of the sources or fix the labels"
                )
            seen.setdefault(key, (label, where))


def protected_texts(data_dir: str | None, reads: str = "prompt") -> set[str]:
    """Normalised texts of every held-out split (PROTECTED_SPLITS) of the shipped safety sets
    that read ``reads``, present in the data folder, whether or not the set is in the mixture:
    they never train."""
    from singlepass.models.data import data_dir as folder_of

    root = folder_of(data_dir)
    out: set[str] = set()
    for name in safety_sources():
        if DATASETS[name].reads != reads or not (root / DATASETS[name].folder).is_dir():
            continue
        for split in set(available_splits(name)) & PROTECTED_SPLITS:
            out |= {normalise(t) for t in load_dataset(name, split, data_dir).texts}
    return out


def keep_new(ds: Dataset, excluded: set[str], seen: set[str]) -> tuple[Dataset, int, int]:
    """Rows of ``ds`` whose text is neither in ``excluded`` nor already ``seen`` (``seen`` grows).
    -> (kept rows, dropped as held out elsewhere, dropped as repeats)."""
    keep, held, repeats = [], 0, 0
    for i, text in enumerate(ds.texts):
        key = normalise(text)
        if key in excluded:
            held += 1
        elif key in seen:
            repeats += 1
        else:
            seen.add(key)
            keep.append(i)
    return ds.subset(keep), held, repeats


def drop_excluded(ds: Dataset, excluded: set[str]) -> tuple[Dataset, int]:
    """Rows of ``ds`` whose normalised text is not in ``excluded`` -> (kept, how many dropped)."""
    if not excluded:
        return ds, 0
    keep = [i for i, t in enumerate(ds.texts) if normalise(t) not in excluded]
    return ds.subset(keep), len(ds) - len(keep)


def concat(datasets: list[Dataset], name: str, split: str, reads: str = "prompt") -> Dataset:
    cols = ("mixture_source", "mixture_split", "row", "mixture_weight")
    if reads == "response":
        cols += ("prompt", "response")
    return Dataset(
        name,
        split,
        [t for ds in datasets for t in ds.texts],
        np.concatenate([ds.labels for ds in datasets]).astype(np.int64),
        LABELS,
        "safety",
        name,
        {c: [v for ds in datasets for v in ds.columns.get(c, [None] * len(ds))] for c in cols},
        reads,
    )


def source_parts(name: str, data_dir: str | None = None, caps: dict | None = None, seed: int = 0) -> dict:
    """{part: Dataset under LABELS} of one source (``parts``); ``caps`` {source: (train cap,
    validation cap)} subsamples its train / validation parts (seeded, stratified) *before* any
    overlap is removed, so every row a mixture keeps is a row of these capped parts (the LOSO
    benchmark caches hidden states per part and reads folds out of them). Test parts are never capped here."""
    train_cap, val_cap = (caps or {}).get(name, (None, None))
    cap = {"train": train_cap, "validation": val_cap}
    return {
        part: to_safety(load_dataset(name, split, data_dir, seed=seed, limit=cap.get(part)))
        for part, split in parts(name).items()
        if split
    }


def file_parts(source: Source, caps: dict | None = None, seed: int = 0) -> dict:
    """{part: Dataset under LABELS} of a file source: ``train`` and ``validation`` a seeded,
    stratified VALIDATION_FRACTION carve of its rows (as for a shipped set without a validation
    split), capped like ``source_parts``; no test part."""
    ds = load_file(source.path, name=source.name)
    try:
        keep, held = stratified_split(ds.labels, VALIDATION_FRACTION, seed=0)
    except ValueError as e:
        raise SinglepassError(f"mixture source {source.path}: too few rows to carve a validation part ({e})") from None
    train_cap, val_cap = (caps or {}).get(source.name, (None, None))
    out = {}
    for part, idx, cap in (("train", keep, train_cap), ("validation", held, val_cap)):
        sub = ds.subset(idx)
        sub.split = part
        out[part] = to_safety(limit_rows(sub, cap, seed))
    return out


def parts_of(source: Source, data_dir: str | None = None, caps: dict | None = None, seed: int = 0) -> dict:
    """``source_parts`` of a shipped set, ``file_parts`` of a file."""
    return file_parts(source, caps, seed) if source.path else source_parts(source.name, data_dir, caps, seed)


def source_texts(name: str, data_dir: str | None = None) -> set[str]:
    """Normalised texts of every part of a source (train, validation and test, uncapped)."""
    return {normalise(t) for ds in source_parts(name, data_dir).values() for t in ds.texts}


def load_mixture(
    text: str,
    data_dir: str | None = None,
    limit: int | None = None,
    val_limit: int | None = None,
    seed: int = 0,
    caps: dict | None = None,
    exclude: tuple[str, ...] = (),
    balanced: bool = False,
    equal_sources: bool = False,
) -> Mixture:
    """Train and validation sets of a mixture (see the module docstring). ``limit`` /
    ``val_limit`` cap each source's rows (seeded, stratified) after the overlaps are removed;
    ``caps`` ({source: (train cap, validation cap)}) before (``source_parts``). ``balanced``: the
    training rows' ``limit`` takes equal class shares (``limit_rows``); validation keeps the proportions.
    ``equal_sources``: a row's weight is also divided by its source's training rows, so each source
    weighs its own weight in total, whatever its size (natural proportions otherwise).

    ``exclude``: safety sources held out entirely (leave-one-source-out): no text of any of their
    parts reaches the training or validation rows, wherever it comes from (e.g. the prompts
    AdvBench shares with StrongREJECT); each source reports those drops as ``*_dropped_excluded``."""
    sources = parse_sources(text)
    if any(s.name in exclude for s in sources):
        raise SinglepassError(f"--dataset {text!r} names a source it also excludes ({', '.join(exclude)})")
    loaded = {s.name: parts_of(s, data_dir, caps, seed) for s in sources}
    check_conflicts([ds for by_part in loaded.values() for ds in by_part.values()])
    excluded = set().union(*(source_texts(name, data_dir) for name in exclude)) if exclude else set()
    reads = sources[0].reads
    tests = {normalise(t) for by_part in loaded.values() for t in by_part.get("test", empty()).texts}
    tests |= protected_texts(data_dir, reads)
    vals = {normalise(t) for by_part in loaded.values() for t in by_part.get("validation", empty()).texts}
    seen_train: set[str] = set()
    seen_val: set[str] = set()
    train_parts, val_parts, report = [], [], {}
    for s in sources:
        by_part = loaded[s.name]
        val, val_out = drop_excluded(by_part.get("validation", empty()), excluded)
        val, val_held, val_rep = keep_new(val, tests, seen_val)
        val = limit_rows(val, val_limit, seed)
        val_parts.append(val)
        entry = {"weight": s.weight, "validation_rows": len(val), "validation_dropped": val_held + val_rep + val_out}
        if exclude:
            entry["validation_dropped_excluded"] = val_out
        if "train" in by_part:
            if by_part["train"].split in PROTECTED_SPLITS:  # parts() never does this; kept as a guard
                raise SinglepassError(f"{s.name}/{by_part['train'].split} is a held-out split and is never trained on")
            tr, out = drop_excluded(by_part["train"], excluded)
            tr, held, rep = keep_new(tr, tests | vals, seen_train)
            tr = limit_rows(tr, limit, seed, balanced)
            tr.columns["mixture_weight"] = [s.weight] * len(tr)
            train_parts.append(tr)
            entry.update({"train_rows": len(tr), "train_dropped_held_out": held, "train_dropped_repeats": rep})
            if exclude:
                entry["train_dropped_excluded"] = out
        else:
            entry["train_rows"] = 0
        entry["test_split"] = by_part["test"].split if "test" in by_part else None  # a file: none
        report[s.name] = entry
    if not train_parts or not sum(len(t) for t in train_parts):
        raise SinglepassError(f"--dataset {text!r}: no source has training rows (saferlhf is a test-only set)")
    name = mixture_name([(s.name, s.weight) for s in sources])
    train = concat(train_parts, name, "train", reads)
    w = np.asarray(train.columns["mixture_weight"], dtype=np.float64)  # [N]
    if equal_sources:
        _, row_source, rows = np.unique(train.columns["mixture_source"], return_inverse=True, return_counts=True)
        w = w / rows[row_source]
    train.columns["mixture_weight"] = (w / w.mean()).tolist()  # mean 1: the loss scale of an unweighted set
    return Mixture(sources, train, concat(val_parts, name, "validation", reads), report)


def mixture_name(sources: list[tuple[str, float]]) -> str:
    """The name of a mixture's train and validation datasets: "source:weight,..."."""
    return ",".join(f"{name}:{weight:g}" for name, weight in sources)


def unweighted_name(name: str) -> str:
    """A ``mixture_name`` with every weight 1 (the weight is what follows a source's last ':')."""
    return mixture_name([(item.rpartition(":")[0], 1) for item in name.split(",")])


def empty() -> Dataset:
    """No rows: the validation part of a source that has none (a test-only source)."""
    return Dataset("", "validation", [], np.zeros(0, dtype=np.int64), LABELS, "safety")


def describe_mixture(m: Mixture) -> list[str]:
    """One line per source: weight, rows used and rows dropped as overlaps."""
    lines = []
    for name, r in m.report.items():
        lines.append(
            f"  {name} (weight {r['weight']:g}): train {r['train_rows']} rows"
            + (
                f" ({r['train_dropped_held_out']} dropped as held out elsewhere, {r['train_dropped_repeats']} repeats)"
                if "train_dropped_held_out" in r
                else " (validation and test only)"
            )
            + f", validation {r['validation_rows']} ({r['validation_dropped']} dropped), "
            + (f"test split {r['test_split']}" if r["test_split"] else "no test part")
            + (
                f"; held-out sources' texts dropped: {r.get('train_dropped_excluded', 0)} train, "
                f"{r['validation_dropped_excluded']} validation"
                if "validation_dropped_excluded" in r
                else ""
            )
        )
    return lines
