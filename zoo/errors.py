"""User errors: the one exception type (its own module so that ``python -m zoo.cli``, which runs
zoo/cli.py as ``__main__``, and the modules importing ``zoo.cli`` share one class) and the
shortening of jsonargparse's reports into one line. Imports nothing of the zoo."""


class ZooError(Exception):
    """A user error: printed as one line, exit code 2."""


def short_parse_error(msg: str) -> str:
    """jsonargparse's nested union report reduced to: the key, what was wrong, the value given."""
    lines = [ln.strip().lstrip("- ").strip() for ln in msg.splitlines() if ln.strip()]
    keep = []
    for ln in lines:
        if ln.startswith(("Does not validate", "Subtypes:", "Errors:", "Expected a <class 'NoneType'>",
                          "Given value type:")):
            continue
        if ln.startswith("Given value:") and len(ln) > 120:
            continue  # a dump of the whole namespace says nothing the other lines do not
        if ln.startswith("Parser key"):
            ln = ln.replace("Parser key", "key").rstrip(":")
        keep.append(ln.rstrip(":"))
    return "; ".join(dict.fromkeys(keep))[:600]
