"""Many vocabularies over one base for `embdeploy serve`: tenants by name, each a fork of one swap Session.

    tenants = Tenants(Session("clinical-swap"))      # the export's own table, named after its directory
    tenants.add("legal", "legal-ext")                # session.fork(extension=...): its tokenizer and (K, H) table
    name, session = tenants.resolve("legal")         # what a request's `model` field picks

Every tenant runs on the base session's one ONNX Runtime session (table_binding "feed": the table
is fed with each run), so the base weights, ORT's prepacked copies and its arena are held once;
a tenant costs its tokenizer and its table (perf/README.md has the measured figure).

Reads never lock: `resolve` takes the current mapping, which `add` and `remove` replace as a
whole. A request keeps the Session it resolved, so a tenant replaced or removed while the request
is in flight finishes on the table it started with.

A tenants file is JSON, {"name": "extension dir", ...}, or lines `name=extension dir` ('#' starts
a comment line); relative paths are relative to the file's directory.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

from ..errors import EmbdeployError, raise_all

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
NAME_RULE = "1-64 characters: letters, digits, '.', '_' or '-', starting with a letter or digit"


class UnknownModel(Exception):
    """A request named a model this server does not have."""


class Tenants:
    """The models a server answers: `default` (the export's own table) and the tenants added to it."""

    def __init__(self, session, default: str | None = None):
        self.base = session
        self.default = default or session.path.name
        self._models = {self.default: session}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        return list(self._models)

    def items(self) -> list[tuple[str, object]]:
        return list(self._models.items())

    @property
    def many(self) -> bool:
        """Whether `model` must name one of several models (with one, any name is that model)."""
        return len(self._models) > 1

    def resolve(self, model: str | None):
        """(name, Session) for a request's `model`: None is the default; unknown names raise UnknownModel
        when there are tenants (a lone model answers to any name, as OpenAI clients must send one)."""
        models = self._models
        if model is None or (not self.many and model not in models):
            return self.default, models[self.default]
        if model not in models:
            raise UnknownModel(f"unknown model {model!r}; this server has: {', '.join(models)}. Send one of them as "
                               "model, or leave model out for the default")
        return model, models[model]

    def add(self, name: str, ext_dir):
        """Open `ext_dir` as tenant `name` (replacing a tenant of that name); returns (Session, replaced)."""
        self._check_name(name)
        if self.base.mode != "swap":
            raise EmbdeployError(
                f"tenants need a swap export: {self.base.path.name} is a {self.base.mode!r} export, whose rows are "
                "built into the graph. Export the extension with `embdeploy export EXT_DIR --mode swap` and serve "
                "that directory with --tenant")
        if name == self.default:
            raise EmbdeployError(f"tenant name {name!r} is the export's own model (the default); pick another name")
        session = self.base.fork(extension=ext_dir)  # outside the lock: reading a table takes time
        with self._lock:
            replaced = name in self._models
            self._models = {**self._models, name: session}
        return session, replaced

    def remove(self, name: str) -> None:
        with self._lock:
            if name == self.default:
                raise EmbdeployError(f"{name!r} is the export's own table (the default model) and cannot be removed")
            if name not in self._models:
                raise UnknownModel(f"no tenant {name!r}; tenants: {', '.join(n for n in self._models if n != self.default) or '(none)'}")
            self._models = {k: v for k, v in self._models.items() if k != name}

    def add_all(self, tenants: dict) -> None:
        """Open every tenant of {name: ext_dir}; every one that fails is reported, in one error."""
        problems = []
        for name, ext_dir in tenants.items():
            try:
                self.add(name, ext_dir)
            except EmbdeployError as e:
                problems.append(f"tenant {name!r} ({ext_dir}): {e}")
        raise_all(problems, "cannot serve these tenants:")

    @staticmethod
    def _check_name(name) -> None:
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise EmbdeployError(f"tenant name {name!r} is not allowed; a name is {NAME_RULE}")


def parse_tenant_args(values) -> dict[str, Path]:
    """{name: path} from `--tenant NAME=EXT_DIR` values; every malformed or repeated one in one error."""
    out, problems = {}, []
    for value in values or []:
        name, sep, path = value.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            problems.append(f"--tenant {value!r} is not NAME=EXT_DIR (e.g. --tenant clinical=clinical-ext)")
        elif name in out:
            problems.append(f"--tenant {name!r} is given twice")
        else:
            out[name] = Path(path).expanduser()
    raise_all(problems, "bad --tenant options:")
    return out


def read_tenants_file(path) -> dict[str, Path]:
    """{name: path} from a tenants file: a JSON object, or `name=path` lines (see the module docstring)."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise EmbdeployError(f"cannot read the tenants file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise EmbdeployError(f"the tenants file {path} is not UTF-8 text") from None
    here = path.resolve().parent
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise EmbdeployError(f"the tenants file {path} is not valid JSON ({e.msg} at line {e.lineno} column "
                                 f"{e.colno}); write {{\"name\": \"extension dir\", ...}}") from None
        bad = [k for k, v in data.items() if not isinstance(v, str) or not v.strip()]
        if bad:
            raise EmbdeployError(f"the tenants file {path}: the value of {', '.join(map(repr, bad))} must be an "
                                 "extension directory (a non-empty string)")
        pairs = list(data.items())
    else:
        pairs, problems = [], []
        for n, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, sep, value = line.partition("=")
            if not sep or not name.strip() or not value.strip():
                problems.append(f"line {n}: {line[:80]!r} is not name=extension dir")
            else:
                pairs.append((name.strip(), value.strip()))
        raise_all(problems, f"the tenants file {path} has lines it cannot read:")
        names = [p[0] for p in pairs]
        twice = sorted({x for x in names if names.count(x) > 1})
        if twice:
            raise EmbdeployError(f"the tenants file {path} names {', '.join(map(repr, twice))} more than once")
    return {name: (Path(value).expanduser() if Path(value).expanduser().is_absolute() else here / value)
            for name, value in pairs}


__all__ = ["Tenants", "UnknownModel", "parse_tenant_args", "read_tenants_file"]
