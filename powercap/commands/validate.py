"""``powercap validate``: check PowerCappingPolicy files offline, with the webhook's messages.

Exit status: 0 when every document is valid, 1 when any is invalid, 2 when a file cannot
be read or parsed or the usage is wrong (2 wins over 1).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from typing import Any, TextIO

import yaml

from powercap.algorithms import AlgorithmRegistry
from powercap.numeric import counted
from powercap.problems import Problem, ValidationResult
from powercap.policies import validate_policy
from powercap.runtime.documents import LOAD_ERRORS, describe_load_error, parse_documents, read_text
from powercap.schema import SAFE_LOADER

EXIT_VALID, EXIT_INVALID, EXIT_UNREADABLE = 0, 1, 2


@dataclass
class DocumentReport:
    file: str
    index: int
    label: str
    result: ValidationResult


@dataclass
class FileError:
    file: str
    message: str


@dataclass
class Report:
    documents: list[DocumentReport] = field(default_factory=list)
    file_errors: list[FileError] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        if self.file_errors:
            return EXIT_UNREADABLE
        if any(not d.result.ok for d in self.documents):
            return EXIT_INVALID
        return EXIT_VALID


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "validate",
        help="validate PowerCappingPolicy files offline",
        description="Validate PowerCappingPolicy documents (YAML or JSON, multi-document, '-' for "
        "stdin) with the same rules and messages as the admission webhook. Exit 0: all valid; "
        "1: some document invalid; 2: a file cannot be read or parsed.",
    )
    parser.add_argument("files", nargs="+", metavar="FILE", help="policy file, or - for stdin")
    parser.add_argument("--output", "-o", choices=("text", "json"), default="text",
                        help="text: a line per problem and a count (default); json: one report for scripts")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    report = validate_files(args.files, AlgorithmRegistry.default(), stdin=sys.stdin)
    if args.output == "json":
        print(json.dumps(report_as_json(report), indent=2))
    else:
        write_text_report(report, sys.stdout)
    return report.exit_code


def validate_files(paths: list[str], registry: AlgorithmRegistry, stdin: TextIO | None) -> Report:
    report = Report()
    for path in paths:
        text = ""
        try:
            if path == "-":
                if stdin is None:  # started with standard input closed
                    raise OSError("standard input is closed")
                text = stdin.read()
            else:
                text = read_text(path)
            documents = list(parse_documents(text))
        except LOAD_ERRORS as error:
            report.file_errors.append(FileError(display_name(path), describe_file_error(error, text)))
            continue
        if not documents and holds_no_document(text):  # nothing to validate is not "valid"
            report.file_errors.append(FileError(display_name(path), "no documents found (the file is empty or only comments)"))
            continue
        for index, document in enumerate(documents):
            report.documents.append(DocumentReport(
                display_name(path), index, document_label(document, index), validate_policy(document, registry)
            ))
    return report


def describe_file_error(error: Exception, text: str) -> str:
    """The load error's words; for YAML, which document of the stream it is in (1-based)."""
    message = describe_load_error(error)
    if isinstance(error, yaml.YAMLError) and text:
        message = f"document {failing_document_number(text)}: {message}"
    return message


def holds_no_document(text: str) -> bool:
    """Whether a stream that parsed has no document at all (empty, comments, bare ``---``),
    as opposed to an empty ``kind: List`` (a cluster with no policies: 0 documents, valid)."""
    try:
        return all(document is None for document in yaml.load_all(text, Loader=SAFE_LOADER))
    except (yaml.YAMLError, ValueError, RecursionError):
        return False


def failing_document_number(text: str) -> int:
    """The number (1-based, counting every ``---`` document of the stream) of the first
    document that does not load."""
    loaded = 0
    try:
        for _ in yaml.load_all(text, Loader=SAFE_LOADER):
            loaded += 1
    except (yaml.YAMLError, ValueError, RecursionError):
        pass
    return loaded + 1


def display_name(path: str) -> str:
    return "<stdin>" if path == "-" else path


def document_label(document: Any, index: int) -> str:
    metadata = document.get("metadata") if isinstance(document, dict) else None
    if not isinstance(metadata, dict) or not isinstance(metadata.get("name"), str) or not metadata["name"]:
        return f"document {index + 1}"
    name, namespace = metadata["name"], metadata.get("namespace")
    return f"{namespace if isinstance(namespace, str) and namespace else 'default'}/{name}"


def write_text_report(report: Report, out: TextIO) -> None:
    for error in report.file_errors:
        out.write(f"{error.file}: error: {error.message}\n")
    for document in report.documents:
        prefix = f"{document.file}: {document.label}" if document.label else document.file
        for problem in document.result.errors:
            out.write(f"{prefix}: {problem}\n")
        for problem in document.result.warnings:
            out.write(f"{prefix}: warning: {problem}\n")
        if document.result.ok:
            out.write(f"{prefix}: valid\n")
    invalid = sum(1 for d in report.documents if not d.result.ok)
    summary = f"{counted(len(report.documents), 'document')}: {len(report.documents) - invalid} valid, {invalid} invalid"
    if report.file_errors:
        summary += f"; {counted(len(report.file_errors), 'file')} unreadable"
    out.write(summary + "\n")


def report_as_json(report: Report) -> dict[str, Any]:
    def problems(items: tuple[Problem, ...]) -> list[dict[str, str]]:
        return [{"path": p.path, "message": p.message} for p in items]

    return {
        "valid": report.exit_code == EXIT_VALID,
        "documents": [
            {
                "file": d.file,
                "index": d.index,
                "object": d.label,
                "valid": d.result.ok,
                "errors": problems(d.result.errors),
                "warnings": problems(d.result.warnings),
            }
            for d in report.documents
        ],
        "fileErrors": [{"file": e.file, "message": e.message} for e in report.file_errors],
    }
