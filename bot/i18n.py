"""The languages Yanray writes its own texts in: English and Simplified Chinese.

Every text Yanray itself writes (help, command answers, notices, refusals, errors the user
sees, the command menus) is an English msgid in the code, translated through a gettext
catalog: `bot/locale/zh/LC_MESSAGES/yanray.po`, compiled to the `.mo` next to it, which is
committed (`scripts/i18n.py` extracts, updates and compiles; a test checks both are up to
date, see docs/decisions/i18n-catalogs.md). Text the model writes is never translated.

A message is marked for extraction where it is written: `tr.gettext("...")` and
`tr.ngettext(...)` where the language is known, `N_("...")` for a constant translated
later, `lazy_gettext`/`lazy_ngettext` for a `Text` made before anyone knows who reads it
(an error raised deep in the core). Placeholders are `{name}` (`str.format`), the same
in both languages.

Which language (`resolve`): `YANRAY_LANGUAGE` `en` or `zh` fixes it for everyone; with
`auto` a conversation's `/lang` choice wins, then the platform's hint (Telegram's
`language_code`, Discord's locale, the terminal's `LANG`), then English.
"""

from __future__ import annotations

import functools
import gettext
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

DOMAIN = "yanray"
LOCALE_DIR = Path(__file__).parent / "locale"
LANGUAGES = ("en", "zh")
DEFAULT_LANGUAGE = "en"
#: each language in its own words, for /lang
LANGUAGE_NAMES = {"en": "English", "zh": "简体中文"}
#: where gettext looks for the terminal's language, first found wins
LOCALE_VARIABLES = ("LANGUAGE", "LC_ALL", "LC_MESSAGES", "LANG")


def N_(message: str) -> str:
    """Marks a constant for the catalog; it is translated where it is shown."""
    return message


def normalize(tag: str | None) -> str:
    """`en` or `zh` for a platform's language tag (`zh-hans`, `zh-CN`, `zh_TW.UTF-8`,
    `en-US`, `C.UTF-8`, ...): any Chinese is `zh` (Traditional readers get Simplified,
    closer than English), anything else or nothing is English."""
    if not tag:
        return DEFAULT_LANGUAGE
    primary = tag.strip().split(".", 1)[0].split("@", 1)[0].replace("_", "-").split("-", 1)[0]
    return "zh" if primary.lower() == "zh" else DEFAULT_LANGUAGE


def environment_hint(environ: Mapping[str, str]) -> str | None:
    """The terminal's language tag, in gettext's order (`LANGUAGE` is a list: its first)."""
    for name in LOCALE_VARIABLES:
        value = environ.get(name, "").split(":", 1)[0].strip()
        if value:
            return value
    return None


def resolve(setting: str, stored: str | None, hint: str | None) -> str:
    """The language to answer in: the operator's fixed one, else the conversation's
    `/lang` choice, else the platform's hint, else English."""
    if setting in LANGUAGES:
        return setting
    if stored in LANGUAGES:
        return stored
    return normalize(hint)


@functools.cache
def translator(language: str) -> gettext.NullTranslations:
    """The catalog of `language` (English is the msgids themselves). A missing catalog is a
    broken installation, and raises."""
    if language == DEFAULT_LANGUAGE or language not in LANGUAGES:
        return gettext.NullTranslations()
    return gettext.translation(DOMAIN, LOCALE_DIR, languages=[language])


@dataclass(frozen=True)
class Text:
    """A message not yet in any language: `render(language)` translates and fills it."""

    msgid: str
    plural: str | None = None
    count: int = 0
    params: Mapping[str, object] = field(default_factory=dict)

    def render(self, language: str) -> str:
        tr = translator(language)
        if self.plural is None:
            template = tr.gettext(self.msgid)
        else:
            template = tr.ngettext(self.msgid, self.plural, self.count)
        return template.format(**self.params)

    def __str__(self) -> str:
        return self.render(DEFAULT_LANGUAGE)


def lazy_gettext(message: str, /, **params: object) -> Text:
    return Text(message, params=params)


def lazy_ngettext(singular: str, plural: str, n: int, /, **params: object) -> Text:
    return Text(singular, plural, n, params)
