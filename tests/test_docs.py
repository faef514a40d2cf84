"""The settings a person can read about are the settings the code reads, and the other way."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def env_example_names() -> set[str]:
    return set(re.findall(r"^([A-Z][A-Z0-9_]+)=", (ROOT / ".env.example").read_text(), re.MULTILINE))


def readme_table_names() -> set[str]:
    return set(re.findall(r"^\| `([A-Z][A-Z0-9_]+)`", (ROOT / "README.md").read_text(), re.MULTILINE))


def names_read_by_code() -> set[str]:
    source = "".join(
        path.read_text() for folder in ("bot", "inference") for path in (ROOT / folder).rglob("*.py")
    )
    return set(re.findall(r'env_\w+\(\s*env,\s*"([A-Z][A-Z0-9_]+)"', source)) | set(
        re.findall(r'env\.get\("([A-Z][A-Z0-9_]+)"', source)
    )


def test_every_setting_is_in_env_example_and_the_readme_table() -> None:
    read = names_read_by_code()
    assert read, "no settings found: the pattern above no longer matches the code"
    assert env_example_names() == read
    assert readme_table_names() == read
