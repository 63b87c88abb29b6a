#!/usr/bin/env python3
"""Validate CycloneDX 1.5 JSON documents against the schema files beside this script, offline.

usage: validate.py SBOM.json...   (exit 0 when every document is valid)
"""
import json
import pathlib
import sys

import jsonschema
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

HERE = pathlib.Path(__file__).resolve().parent / "cyclonedx-1.5"


def registry():
    resources = []
    for name in ("bom-1.5.SNAPSHOT.schema.json", "spdx.SNAPSHOT.schema.json", "jsf-0.82.SNAPSHOT.schema.json"):
        doc = json.loads((HERE / name).read_text())
        resource = Resource.from_contents(doc, default_specification=DRAFT7)
        # References are relative to the main schema's $id.
        resources.append(("http://cyclonedx.org/schema/" + name, resource))
        resources.append((name, resource))
        if "$id" in doc:
            resources.append((doc["$id"], resource))
    return Registry().with_resources(resources)


def main(paths):
    schema = json.loads((HERE / "bom-1.5.SNAPSHOT.schema.json").read_text())
    validator = jsonschema.Draft7Validator(schema, registry=registry(), format_checker=jsonschema.FormatChecker())
    bad = 0
    for p in paths:
        doc = json.loads(pathlib.Path(p).read_text())
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.path))
        for e in errors[:20]:
            print(f"{p}: {'/'.join(map(str, e.path)) or '(root)'}: {e.message}")
        bad += bool(errors)
        if not errors:
            print(f"{p}: valid CycloneDX 1.5")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
