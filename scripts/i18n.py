"""Yanray's message catalogs: extract the marked texts, update the Chinese catalog, compile it.

    .venv/bin/python scripts/i18n.py          # after changing a marked text: then translate
                                              # the new or fuzzy entries in the .po and run again
    .venv/bin/python scripts/i18n.py --check  # exit 1 if the template, the .po or the .mo is stale

The template (`bot/locale/yanray.pot`) is extracted from bot/ and adapters/ with Babel; the
Chinese catalog (`bot/locale/zh/LC_MESSAGES/yanray.po`) is updated from it and compiled to
the `.mo` beside it. Both the .po and the .mo are committed, so a plain `pip install .` ships
them without Babel (docs/decisions/i18n-catalogs.md). tests/test_i18n.py runs the same check.
"""

from __future__ import annotations

import argparse
import io
import sys
from datetime import UTC, datetime
from pathlib import Path

from babel.messages.catalog import Catalog
from babel.messages.extract import DEFAULT_KEYWORDS, extract_from_dir
from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po, write_po

ROOT = Path(__file__).resolve().parents[1]
LOCALE = ROOT / "bot" / "locale"
TEMPLATE = LOCALE / "yanray.pot"
LANGUAGES = ("zh",)
SOURCES = ("bot", "adapters")
STAMP = datetime(2026, 12, 1, tzinfo=UTC)
KEYWORDS = {**DEFAULT_KEYWORDS, "lazy_gettext": None, "lazy_ngettext": (1, 2)}


def po_path(language: str) -> Path:
    return LOCALE / language / "LC_MESSAGES" / "yanray.po"


def extract() -> Catalog:
    """Every marked text in the code, as a template catalog."""
    template = Catalog(project="yanray", domain="yanray", fuzzy=False)
    for source in SOURCES:
        for filename, lineno, message, comments, context in extract_from_dir(
            ROOT / source, [("**.py", "python")], keywords=KEYWORDS
        ):
            template.add(
                message, None, [(f"{source}/{filename}", lineno)], auto_comments=comments, context=context
            )
    return template


def _po_text(catalog: Catalog) -> bytes:
    out = io.BytesIO()
    # file names but no line numbers: moving code does not make the catalogs stale
    write_po(out, catalog, width=100, sort_output=True, ignore_obsolete=True, include_lineno=False)
    return out.getvalue()


def _mo_bytes(catalog: Catalog) -> bytes:
    out = io.BytesIO()
    write_mo(out, catalog)
    return out.getvalue()


def _stamp(catalog: Catalog) -> Catalog:
    # dates and versions in the header change on every run; fixed, the files change only with their texts
    catalog.creation_date = catalog.revision_date = STAMP
    catalog.project, catalog.version = "Yanray", "0.1.0"
    catalog.msgid_bugs_address = ""
    return catalog


def build() -> dict[Path, bytes]:
    """The contents the template, each .po and each .mo should have now."""
    template = _stamp(extract())
    files = {TEMPLATE: _po_text(template)}
    for language in LANGUAGES:
        path = po_path(language)
        with path.open("rb") as handle:
            catalog = read_po(handle, locale=language)
        catalog.update(template, update_header_comment=False)
        _stamp(catalog)
        files[path] = _po_text(catalog)
        # what is compiled is what the .po says now (fuzzy entries are left out, as gettext would)
        files[path.with_suffix(".mo")] = _mo_bytes(catalog)
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale files (exit 1)")
    args = parser.parse_args()
    stale = [path for path, data in build().items() if not path.is_file() or path.read_bytes() != data]
    if args.check:
        for path in stale:
            print(
                f"{path.relative_to(ROOT)} is out of date; run .venv/bin/python scripts/i18n.py",
                file=sys.stderr,
            )
        return 1 if stale else 0
    for path, data in build().items():
        path.write_bytes(data)
    print(f"updated {len(stale)} file(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
