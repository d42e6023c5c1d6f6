#!/usr/bin/env python3
"""Checks of the deployment files under deploy/ that need no Docker, cluster or Grafana.

    python tests/deploy_files/check.py compose [--file F] [--schema S]
        deploy/compose.yaml against the Compose Specification's JSON schema
        (deploy/schemas/compose-spec.json).

    python tests/deploy_files/check.py argo FILE [--schema S]
        an Argo Workflow (YAML or JSON; every document of a multi-document YAML file) against
        the `io.argoproj.workflow.v1alpha1.Workflow` definition of Argo's JSON schema
        (deploy/schemas/argo-workflow.json).

    python tests/deploy_files/check.py dashboard METRICS_FILE [--dashboard D]
        every metric that a panel of deploy/grafana/dashboards/orchestrate.json queries is
        exported in METRICS_FILE (a Prometheus text exposition, e.g. saved from
        `curl http://127.0.0.1:8080/metrics`), and every panel has a query.

Exit status: 0 when the check passes, 1 when it finds problems (each printed on its own
line), 2 when a file cannot be read or parsed, or for a usage error.

Needs Python 3.11+ with `jsonschema` (4.18 or newer, which brings `referencing`; older ones
are used through their RefResolver) and `pyyaml`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator

import yaml
import jsonschema
from jsonschema.exceptions import ValidationError, best_match

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE_FILE = DEPLOY / "compose.yaml"
COMPOSE_SCHEMA = DEPLOY / "schemas" / "compose-spec.json"
ARGO_SCHEMA = DEPLOY / "schemas" / "argo-workflow.json"
ARGO_WORKFLOW_DEF = "io.argoproj.workflow.v1alpha1.Workflow"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "orchestrate.json"


class Unreadable(Exception):
    """A file that cannot be read or parsed: exit status 2."""


# ---------------------------------------------------------------------------------- helpers


def load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise Unreadable(f"{path}: {e.strerror or e}") from e
    except json.JSONDecodeError as e:
        raise Unreadable(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from e


def load_yaml_documents(path: Path) -> list[Any]:
    """Every document of a YAML (or JSON) file; empty documents are dropped."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise Unreadable(f"{path}: {e.strerror or e}") from e
    if path.suffix.lower() == ".json":
        try:
            return [json.loads(text)]
        except json.JSONDecodeError as e:
            raise Unreadable(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from e
    try:
        return [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise Unreadable(f"{where}: invalid YAML: {getattr(e, 'problem', None) or e}") from e


def json_path(error: ValidationError) -> str:
    """The instance location of an error, as `$.services.proxy.ports[0]`."""
    out = "$"
    for part in error.absolute_path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", part):
            out += f".{part}"
        else:
            out += f"[{json.dumps(part)}]"
    return out


def describe(error: ValidationError) -> str:
    """One line for an error; for a failed oneOf/anyOf, the sub-error that fits best too."""
    line = f"{json_path(error)}: {error.message}"
    if error.context:
        inner = best_match(error.context)
        if inner is not None and inner.message != error.message:
            line += f" (closest: {json_path(inner)}: {inner.message})"
    return line


def report(errors: Iterable[ValidationError], prefix: str = "") -> int:
    """Prints the errors sorted by location; returns how many there were."""
    errs = sorted(errors, key=lambda e: [str(p) for p in e.absolute_path])
    for e in errs:
        print(f"{prefix}{describe(e)}")
    return len(errs)


# ---------------------------------------------------------------------------------- compose


def check_compose(file: Path, schema_path: Path) -> int:
    schema = load_json(schema_path)
    docs = load_yaml_documents(file)
    if len(docs) != 1:
        print(f"{file}: expected one YAML document, found {len(docs)}")
        return 1
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    cls.check_schema(schema)
    n = report(cls(schema).iter_errors(docs[0]), prefix=f"{file}: ")
    if n:
        print(f"{file}: {n} error(s) against {schema_path.name}")
        return 1
    services = docs[0].get("services") or {}
    print(f"{file}: valid ({len(services)} services) against {schema_path.name}")
    return 0


# ------------------------------------------------------------------------------------- argo


def argo_validator(schema: dict) -> jsonschema.protocols.Validator:
    """A validator for the Workflow definition, with every `#/definitions/...` reference of
    the definitions-only document resolved inside it (nothing is fetched)."""
    base = schema.get("$id") or "urn:argo-workflows:schema"
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    entry = {"$schema": schema.get("$schema", cls.META_SCHEMA["$schema"]),
             "$ref": f"{base}#/definitions/{ARGO_WORKFLOW_DEF}"}
    try:
        from referencing import Registry, Resource
        from referencing.jsonschema import specification_with
    except ImportError:  # jsonschema < 4.18
        resolver = jsonschema.RefResolver(base_uri=base, referrer=schema, store={base: schema})
        return cls(entry, resolver=resolver)
    spec = specification_with(schema.get("$schema", cls.META_SCHEMA["$schema"]))
    resource = Resource.from_contents(schema, default_specification=spec)
    registry = Registry().with_resource(uri=base, resource=resource)
    return cls(entry, registry=registry)


def check_argo(file: Path, schema_path: Path) -> int:
    schema = load_json(schema_path)
    if ARGO_WORKFLOW_DEF not in schema.get("definitions", {}):
        raise Unreadable(f"{schema_path}: no definitions/{ARGO_WORKFLOW_DEF}")
    docs = load_yaml_documents(file)
    if not docs:
        print(f"{file}: no document")
        return 1
    validator = argo_validator(schema)
    failed = 0
    for i, doc in enumerate(docs):
        where = f"{file}" if len(docs) == 1 else f"{file} (document {i + 1})"
        n = report(validator.iter_errors(doc), prefix=f"{where}: ")
        if n:
            print(f"{where}: {n} error(s) against {ARGO_WORKFLOW_DEF}")
            failed += 1
        else:
            name = (doc.get("metadata") or {}).get("name") or (doc.get("metadata") or {}).get(
                "generateName", "?")
            print(f"{where}: valid Workflow {name!r}")
    return 1 if failed else 0


# -------------------------------------------------------------------------------- dashboard

METRIC_REF = re.compile(r"(?<![A-Za-z0-9_:])orchestrate_[a-z0-9_]+")
# Suffixes a sample name adds to its family name (text format and OpenMetrics).
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
OTHER_SUFFIXES = ("_total", "_created", "_info", "_gsum", "_gcount")
SAMPLE_NAME = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*(?:\{|\s)")


def dashboard_panels(panels: list[dict]) -> Iterator[dict]:
    """Every panel, rows' nested panels included (rows themselves are only containers)."""
    for p in panels or []:
        if p.get("type") == "row":
            yield from dashboard_panels(p.get("panels") or [])
        else:
            yield p


def parse_exposition(path: Path) -> tuple[dict[str, str], set[str]]:
    """(family name -> type from `# TYPE` lines, names of the samples)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise Unreadable(f"{path}: {e.strerror or e}") from e
    families: dict[str, str] = {}
    samples: set[str] = set()
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 4 and parts[1] == "TYPE":
                families[parts[2]] = parts[3].strip()
            elif len(parts) == 3 and parts[1] == "TYPE":
                families[parts[2]] = "untyped"
            continue
        m = SAMPLE_NAME.match(line + " ")
        if m:
            samples.add(m.group(1))
    return families, samples


def family_of(name: str) -> str:
    """The family a referenced name belongs to: histogram series name their histogram."""
    for s in HISTOGRAM_SUFFIXES:
        if name.endswith(s):
            return name[: -len(s)]
    return name


def exported(name: str, families: dict[str, str], samples: set[str]) -> bool:
    if name in samples or name in families:
        return True
    for s in HISTOGRAM_SUFFIXES + OTHER_SUFFIXES:
        if name.endswith(s) and name[: -len(s)] in families:
            return True
    return False


def check_dashboard(dashboard_path: Path, metrics_path: Path) -> int:
    dash = load_json(dashboard_path)
    if "panels" not in dash and isinstance(dash.get("dashboard"), dict):
        dash = dash["dashboard"]  # the API's {"dashboard": {...}} wrapper
    families, samples = parse_exposition(metrics_path)
    if not families and not samples:
        print(f"{metrics_path}: no metric in the exposition")
        return 1
    problems = 0
    panels = list(dashboard_panels(dash.get("panels", [])))
    if not panels:
        print(f"{dashboard_path}: the dashboard has no panel")
        return 1
    referenced: set[str] = set()
    for p in panels:
        title = p.get("title") or "(untitled)"
        label = f"panel {title!r} (id {p.get('id', '?')})"
        targets = p.get("targets") or []
        if not targets:
            print(f"{label}: no targets")
            problems += 1
            continue
        names: set[str] = set()
        for t in targets:
            expr = t.get("expr")
            if not isinstance(expr, str) or not expr.strip():
                print(f"{label}: target {t.get('refId', '?')} has no PromQL expr")
                problems += 1
                continue
            names.update(METRIC_REF.findall(expr))
        if not names and any(isinstance(t.get("expr"), str) and t["expr"].strip() for t in targets):
            print(f"{label}: no orchestrate_* metric in its queries")
            problems += 1
        missing = sorted({family_of(n) for n in names if not exported(n, families, samples)})
        for m in missing:
            print(f"{label}: {m} is not exported (not in {metrics_path})")
            problems += 1
        referenced.update(family_of(n) for n in names)
    if problems:
        print(f"{dashboard_path}: {problems} problem(s)")
        return 1
    print(f"{dashboard_path}: {len(panels)} panels, {len(referenced)} metric families, "
          f"all exported in {metrics_path}")
    return 0


# -------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("compose", help="validate deploy/compose.yaml against the Compose spec")
    c.add_argument("--file", type=Path, default=COMPOSE_FILE)
    c.add_argument("--schema", type=Path, default=COMPOSE_SCHEMA)

    a = sub.add_parser("argo", help="validate an Argo Workflow against Argo's schema")
    a.add_argument("file", type=Path)
    a.add_argument("--schema", type=Path, default=ARGO_SCHEMA)

    d = sub.add_parser("dashboard", help="check the dashboard's metrics against an exposition")
    d.add_argument("metrics_file", type=Path)
    d.add_argument("--dashboard", type=Path, default=DASHBOARD)

    args = ap.parse_args(argv)
    try:
        if args.cmd == "compose":
            return check_compose(args.file, args.schema)
        if args.cmd == "argo":
            return check_argo(args.file, args.schema)
        return check_dashboard(args.dashboard, args.metrics_file)
    except Unreadable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except jsonschema.SchemaError as e:
        print(f"error: the schema itself is invalid: {e.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
