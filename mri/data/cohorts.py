"""Cohort presets: find volumes, join each one to its CSV row, read its attributes.

A preset says how to get an id from a volume's path, which CSV row it belongs to, and how each attribute
is read from that row (column, kind, label map). `adni`, `oasis1` and `ixi` are built in; `custom` is
made from command-line options.
"""
import csv
import math
import os
import re
from dataclasses import dataclass, field

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".img")

# ADNIMERGE spells diagnosis in two ways: DX (CN / MCI / Dementia) and DX_bl (CN, SMC, EMCI, LMCI, AD).
ADNI_DX_MAP = {"CN": "CN", "SMC": "CN", "MCI": "MCI", "EMCI": "MCI", "LMCI": "MCI",
               "Dementia": "Dementia", "AD": "Dementia"}
DX_CLASSES = ["CN", "MCI", "Dementia"]


class CohortError(ValueError):
    """The CSV or the arguments cannot be used at all; the message says what to change."""


@dataclass
class AttrSpec:
    """How one attribute is read from a CSV row."""
    name: str
    kind: str                       # continuous | binary | categorical
    columns: tuple                  # CSV columns it needs
    classes: list = field(default_factory=list)
    label_map: dict = field(default_factory=dict)
    combine: object = None          # row -> raw string/float; default: the first column's value

    def raw(self, row):
        return self.combine(row) if self.combine else row[self.columns[0]]

    def parse(self, row):
        """Row -> float (continuous), or class index (binary/categorical); NaN when missing.
        Raises KeyError(label) for a label outside the classes and the map."""
        value = self.raw(row)
        if isinstance(value, str):
            value = value.strip()
            if value == "" or value.upper() in ("NA", "NAN", "N/A"):
                return math.nan
        if self.kind == "continuous":
            v = float(value)
            return v if math.isfinite(v) else math.nan
        label = self.label_map.get(str(value), str(value))
        if label not in self.classes:
            raise KeyError(str(value))
        return self.classes.index(label)


@dataclass
class Preset:
    name: str
    id_pattern: str                 # regex on the path, captures the join key(s)
    key_columns: tuple              # CSV columns matched against the captured groups, in order
    subject: object                 # (match, row) -> subject id
    visit: object                   # (match, row) -> visit label
    attrs: dict                     # name -> AttrSpec
    default_attrs: tuple
    stratify: str = "dx"

    def path_key(self, path):
        m = re.search(self.id_pattern, path)
        return (m, tuple(_norm_key(g) for g in m.groups())) if m else (None, None)

    def row_key(self, row):
        return tuple(_norm_key(row[c]) for c in self.key_columns)


def _norm_key(value):
    """Join keys compare as text without leading zeros ('0002' == '2', '2.0' == '2')."""
    value = str(value).strip()
    if re.fullmatch(r"\d+(\.0+)?", value):
        return str(int(float(value)))
    return value


def _adni_age(row):
    base, years = row["AGE"].strip(), row["Years_bl"].strip()
    if not base or not years:
        return math.nan
    return float(base) + float(years)


def _continuous(name, column):
    return AttrSpec(name, "continuous", (column,))


PRESETS = {
    "adni": Preset(
        name="adni",
        id_pattern=r"ADNI_(\d{3}_S_\d{4})_.*_I(\d+)\.",
        key_columns=("PTID", "IMAGEUID"),
        subject=lambda m, row: row["PTID"], visit=lambda m, row: row["VISCODE"],
        attrs={
            "age": AttrSpec("age", "continuous", ("AGE", "Years_bl"), combine=_adni_age),
            "dx": AttrSpec("dx", "categorical", ("DX",), DX_CLASSES, ADNI_DX_MAP),
            "adas13": _continuous("adas13", "ADAS13"),
            "mmse": _continuous("mmse", "MMSE"),
            "faq": _continuous("faq", "FAQ"),
            "sex": AttrSpec("sex", "binary", ("PTGENDER",), ["Male", "Female"]),
            "educ": _continuous("educ", "PTEDUCAT"),
        },
        default_attrs=("age", "dx", "adas13", "mmse", "faq", "sex", "educ"),
    ),
    "oasis1": Preset(
        name="oasis1",
        id_pattern=r"(OAS1_\d{4}_MR1)",
        key_columns=("ID",),
        subject=lambda m, row: row["ID"][:9], visit=lambda m, row: "MR1",
        attrs={
            "age": _continuous("age", "Age"),
            "sex": AttrSpec("sex", "binary", ("M/F",), ["M", "F"]),
            "mmse": _continuous("mmse", "MMSE"),
            "cdr": AttrSpec("cdr", "categorical", ("CDR",), ["0", "0.5", "1", "2"],
                            {"0.0": "0", "1.0": "1", "2.0": "2"}),
        },
        default_attrs=("age", "sex"),
        stratify="cdr",
    ),
    "ixi": Preset(
        name="ixi",
        id_pattern=r"IXI(\d{3})-[^/\\]*$",
        key_columns=("IXI_ID",),
        subject=lambda m, row: f"IXI{int(m.group(1)):03d}", visit=lambda m, row: "bl",
        attrs={
            "age": _continuous("age", "AGE"),
            "sex": AttrSpec("sex", "binary", ("SEX_ID",), ["1", "2"]),
        },
        default_attrs=("age", "sex"),
        stratify="",
    ),
}


def custom_preset(id_regex, id_column, attr_columns):
    """`--id-regex` (one group), `--id-column`, `--attr-columns name:column:kind[,...]`.
    Categorical/binary classes are the sorted values seen in the CSV (filled in by `read_csv`)."""
    if not id_regex or not id_column or not attr_columns:
        raise CohortError("--preset custom needs --id-regex, --id-column and --attr-columns name:column:kind,...")
    if re.compile(id_regex).groups != 1:
        raise CohortError(f"--id-regex {id_regex!r} must have exactly one capture group (the id)")
    attrs = {}
    for item in attr_columns.split(","):
        parts = item.split(":")
        if len(parts) != 3 or parts[2] not in ("continuous", "binary", "categorical"):
            raise CohortError(f"--attr-columns item {item!r} must be name:column:kind "
                              "with kind continuous, binary or categorical")
        attrs[parts[0]] = AttrSpec(parts[0], parts[2], (parts[1],))
    stratify = next((n for n, a in attrs.items() if a.kind == "categorical"), "")
    return Preset("custom", id_regex, (id_column,), subject=lambda m, row: row[id_column],
                  visit=lambda m, row: "bl", attrs=attrs, default_attrs=tuple(attrs), stratify=stratify)


def apply_label_maps(preset, label_maps):
    """`--label-map dx:SMC=CN,cdr:3=2` entries extend the presets' maps."""
    for item in label_maps or []:
        m = re.fullmatch(r"([^:]+):(.+)=(.+)", item.strip())
        if not m or m.group(1) not in preset.attrs:
            raise CohortError(f"--label-map {item!r} must be ATTR:VALUE=CLASS with ATTR one of {list(preset.attrs)}")
        preset.attrs[m.group(1)].label_map[m.group(2)] = m.group(3)


def find_volumes(root):
    """Every .nii, .nii.gz and Analyze .img under `root`, sorted; hidden files (temporary ones) are ignored."""
    found = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.endswith(VOLUME_SUFFIXES) and not f.startswith("."):
                found.append(os.path.join(dirpath, f))
    return sorted(found)


def read_csv(path, preset, attr_names):
    """Read the cohort CSV; check that every needed column exists. Returns the rows (list of dicts)."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise CohortError(f"cannot read CSV {path}: {e}") from e
    columns = set(rows[0]) if rows else set()
    unknown = [a for a in attr_names if a not in preset.attrs]
    if unknown:
        raise CohortError(f"--attrs {unknown} not defined by preset {preset.name!r}; it defines {list(preset.attrs)}")
    needed = list(preset.key_columns) + [c for a in attr_names for c in preset.attrs[a].columns]
    missing = [c for c in dict.fromkeys(needed) if c not in columns]
    if missing:
        raise CohortError(
            f"{path}: missing column(s) {missing}. Preset {preset.name!r} expects {sorted(set(needed))} "
            f"for --attrs {','.join(attr_names)}; the CSV has {sorted(columns)}. Rename the columns, "
            f"choose other --attrs, or use --preset custom.")
    for name in attr_names:
        spec = preset.attrs[name]
        if spec.kind != "continuous" and not spec.classes:
            values = sorted({str(spec.raw(r)).strip() for r in rows} - {"", "NA", "nan", "NaN"})
            if spec.kind == "binary" and len(values) != 2:
                raise CohortError(f"{path}: binary attribute {name!r} (column {spec.columns[0]}) "
                                  f"needs exactly two values, found {values}")
            spec.classes = values
    return rows


def join(volumes, rows, preset):
    """Match volumes to CSV rows. Returns (pairs [(path, match, row)], unmatched volumes, rows with no volume)."""
    by_key = {}
    for row in rows:
        by_key.setdefault(preset.row_key(row), row)
    pairs, unmatched, used = [], [], set()
    for path in volumes:
        match, key = preset.path_key(path)
        row = by_key.get(key) if key else None
        if row is None:
            unmatched.append(path)
        else:
            pairs.append((path, match, row))
            used.add(key)
    orphans = [k for k in by_key if k not in used]
    return pairs, unmatched, orphans


def check_labels(pairs, preset, attr_names, csv_path):
    """Stop at once on a label outside an attribute's classes and map, listing what was seen."""
    for name in attr_names:
        spec = preset.attrs[name]
        if spec.kind == "continuous":
            continue
        bad = set()
        for _, _, row in pairs:
            try:
                spec.parse(row)
            except KeyError as e:
                bad.add(e.args[0])
        if bad:
            seen = sorted({str(spec.raw(r)).strip() for _, _, r in pairs})
            raise CohortError(
                f"{csv_path}: unknown {name!r} label(s) {sorted(bad)} in column {spec.columns[0]}; "
                f"values seen: {seen}; classes: {spec.classes}; known spellings: {spec.label_map or 'none'}. "
                f"Map them with --label-map {name}:{sorted(bad)[0]}=<one of {spec.classes}>.")
