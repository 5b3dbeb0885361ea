"""The README's reference tables say what the code does: DMAuditor's options and defaults, the tags an audit logs, and
links that resolve. A changed default or a new option or tag fails here until the README says so too."""

import ast
import inspect
import re
from pathlib import Path

from opacus_dmaudit import DMAuditor
from opacus_dmaudit.report import audit_scalars
from test_report import audit_record

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]


def section(text: str, heading: str) -> str:
    """The body of a ``## heading`` section, up to the next heading of that level."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert match, f"README has no '## {heading}' section"
    return match.group(1)


def table_rows(body: str) -> list[list[str]]:
    """The cells of the body rows of the first Markdown table in ``body`` (the header and its rule left out)."""
    lines = body.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in lines[start + 2 : end]]


def code_spans(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def test_the_options_table_names_each_keyword_of_dmauditor_with_its_default():
    rows = table_rows(section(README.read_text(), "Options"))
    documented = {code_spans(name)[0]: code_spans(default)[0] for name, default, _ in rows}
    parameters = {name: p.default for name, p in inspect.signature(DMAuditor).parameters.items()
                  if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert sorted(documented) == sorted(parameters)
    for name, default in parameters.items():
        assert ast.literal_eval(documented[name]) == default, f"README gives {name}'s default as {documented[name]}"


def test_the_log_table_names_each_scalar_an_audit_writes():
    rows = table_rows(section(README.read_text(), "What an audit logs"))
    patterns = [re.compile(re.escape(span).replace("<metric>", r"\w+").replace("@<η>", r"@[\d.]+") + "$")
                for tags, _ in rows for span in code_spans(tags)]
    tags = audit_scalars(audit_record(1))
    assert {"noisy/psnr", "success_rate/ssim@0.5", "rero_bound/ssim@0.5", "privacy/epsilon"} <= set(tags)
    missing = [tag for tag in tags if not any(pattern.match(tag) for pattern in patterns)]
    assert not missing, f"the README's log table does not name {missing}"


def test_local_links_in_the_readme_and_docs_resolve():
    broken = []
    for page in DOCS:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
            if not re.match(r"[a-z]+://", target) and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert len(DOCS) > 1 and not broken, broken
