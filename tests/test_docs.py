"""The repo's words point at what a reader of the repo has: no planning documents, tickets or their
sections cited from code, configs, tests, docs or scripts."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ["finetune", "tests", "docs", "README.md", "conf", "recipes", "scripts"]

# Built from pieces so that this file does not match itself.
NOTE, ORIGIN, ISSUE, RECIPE = "no" + "te", "se" + "ed", "iss" + "ue", "reci" + "pe"
CITATIONS = re.compile("|".join([
    f"design[ -]{NOTE}",                                       # the planning document of a use case
    f"{ORIGIN}'?s?\\b.*{RECIPE}", f"{ORIGIN}s'", f"the {ORIGIN}'s",   # the projects this one grew from
    f"{ISSUE} [0-9]", f"the {ISSUE}'s",                        # a ticket
    f"{NOTE} \u00a7",                                          # a section of such a document
    f"(trade-log|trading-decision|writing-style|sentiment|news-impact) {NOTE}s?\\b",
]), re.IGNORECASE)


def citations(root: Path, paths: list[str]) -> list[str]:
    """'file:line: text' for each line under root/`paths` (files or folders, recursively) that cites a document."""
    found = []
    for top in paths:
        top = root / top
        for path in sorted([top] if top.is_file() else top.rglob("*")):
            if not path.is_file() or "__pycache__" in path.parts:
                continue
            for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                if CITATIONS.search(line):
                    found.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    return found


def test_no_citations_of_documents_the_reader_does_not_have():
    found = citations(ROOT, SCANNED)
    assert not found, ("these lines cite a document that is not in the repo; say what it means here instead:\n"
                       + "\n".join(found))


def test_the_check_finds_a_citation(tmp_path):
    (tmp_path / "a.py").write_text(f"x = 1\n# lr as in the trading-decision design {NOTE}\n# see {ISSUE} 5\n")
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "b.yaml").write_text("seed: 42   # the random seed is not a citation\n")
    assert citations(tmp_path, ["a.py", "conf"]) == [f"a.py:2: # lr as in the trading-decision design {NOTE}",
                                                     f"a.py:3: # see {ISSUE} 5"]
