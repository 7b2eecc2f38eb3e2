"""Attribute values and targets from the command line, checked against a method's schema."""
import re
import sys




def parse_value(attribute, text):
    """Raw value of one attribute from the command line: a number, or a class name (case-insensitive)."""
    text = text.strip()
    if attribute.kind == "continuous":
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{attribute.name}={text}: {attribute.name} is continuous, give a number") from None
    classes = [str(c) for c in attribute.classes] or ["0", "1"]
    for exact in (True, False):
        for i, c in enumerate(classes):
            if c == text if exact else c.lower() == text.lower():
                return float(i)
    raise ValueError(f"{attribute.name}={text}: not a class of {attribute.name}; its classes are {', '.join(classes)}")


def parse_pairs(text, schema, flag):
    """'age=72,dx=CN' -> {name: raw value}, names checked against the method's schema."""
    out = {}
    for item in (x for x in text.split(",") if x.strip()):
        name, eq, value = item.partition("=")
        name = name.strip()
        if not eq or not value.strip():
            raise ValueError(f"{flag} {text!r}: write NAME=VALUE pairs separated by commas, e.g. age=72,dx=CN")
        out[name] = parse_value(attribute_of(schema, name, flag), value)
    return out


def attribute_of(schema, name, flag):
    if name not in schema.names:
        raise KeyError(f"{flag}: unknown attribute {name!r}; the method knows {', '.join(schema.names)}")
    return schema[name]


def label(attribute, raw):
    return f"{float(raw):g}" if attribute.kind == "continuous" else attribute.label(raw)


def parse_targets(schema, age="", dx="", target=()):
    """[(name, {attribute: raw value})] in the order asked, duplicates dropped: each comma-separated `age` and
    `dx` value alone (--age, --dx), then each NAME=VALUE,... of `target` (--target)."""
    out = []
    for flag, name, values in (("--age", "age", age), ("--dx", "dx", dx)):
        values = [v for v in values.split(",") if v.strip()]
        if values:
            a = attribute_of(schema, name, flag)
            out += [{name: parse_value(a, v)} for v in values]
    out += [parse_pairs(t, schema, "--target") for t in target]
    named, seen = [], set()
    for change in out:
        name = "_".join(f"{n}_{label(schema[n], v)}" for n, v in change.items())
        name = re.sub(r"[^A-Za-z0-9.+-]+", "_", name)
        if change and name not in seen:
            seen.add(name)
            named.append((name, change))
    if not named:
        raise ValueError("no target given: use --age, --dx or --target NAME=VALUE")
    return named


def warn_out_of_range(schema, values, what, where):
    for n, v in values.items():
        a = schema[n]
        if a.kind == "continuous" and a.quantiles and not a.quantiles[0] <= v <= a.quantiles[-1]:
            print(f"warning: {what} {n}={v:g} is outside the training range {a.quantiles[0]:.1f}..{a.quantiles[-1]:.1f} "
                  f"of {where}; the method extrapolates there", file=sys.stderr)
