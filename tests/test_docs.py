"""The README and docs/ pages: their code runs, their links resolve, every
option is named, and docs/api.md is what docs/gen_api.py writes now.

Page rules (also stated in docs/index.md for writers): every ```python block
runs in a fresh namespace, except a block whose first line is ``# continued``,
which runs in the namespace of the block before it on the same page.
"""

import importlib.util
import inspect
import pathlib
import re

import pytest

import galore_jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
API = DOCS / "api.md"
CONTINUED = "# continued"


def pages():
  """README.md and every docs/*.md page, in a fixed order."""
  return [README, *sorted(DOCS.glob("*.md"))]


def python_blocks(path):
  """The ```python blocks of a markdown page, in order."""
  text = pathlib.Path(path).read_text(encoding="utf-8")
  return re.findall(r"^```python\n(.*?)^```[ \t]*$", text, re.S | re.M)


def programs(path):
  """The page's blocks grouped into programs: ``(first index, [blocks])``,
  a ``# continued`` block joining the program of the block before it."""
  groups = []
  for i, block in enumerate(python_blocks(path)):
    if block.startswith(CONTINUED):
      if not groups:
        raise ValueError(f"{path}: block {i} continues no block")
      groups[-1][1].append(block)
    else:
      groups.append((i, [block]))
  return groups


def run_blocks(path, blocks, first=0, scope=None):
  """Executes ``blocks`` in one namespace (fresh unless given); returns it."""
  scope = {"__name__": "__docs__"} if scope is None else scope
  for i, block in enumerate(blocks, first):
    code = compile(block, f"{path}[python block {i}]", "exec")
    exec(code, scope)  # pylint: disable=exec-used
  return scope


def run_block(path, i):
  """Runs block ``i`` of a page (with the blocks it continues); its scope."""
  for first, blocks in programs(path):
    if first <= i < first + len(blocks):
      return run_blocks(path, blocks[: i - first + 1], first)
  raise IndexError(f"{path} has no python block {i}")


def _program_cases():
  cases = []
  for path in pages():
    for first, blocks in programs(path):
      rel = path.relative_to(ROOT).as_posix()
      cases.append(pytest.param(path, first, blocks, id=f"{rel}:{first}"))
  return cases


@pytest.mark.parametrize("path,first,blocks", _program_cases())
def test_python_blocks_run(path, first, blocks):
  run_blocks(path, blocks, first)


# --- links --------------------------------------------------------------------


def _prose(text):
  """``text`` without fenced code blocks and inline code spans."""
  text = re.sub(r"^```.*?^```[ \t]*$", "", text, flags=re.S | re.M)
  return re.sub(r"(`+)(?!`).*?(?<!`)\1(?!`)", "", text, flags=re.S)


def slug(heading):
  """GitHub's anchor for a heading: lower case, punctuation dropped,
  spaces as hyphens."""
  text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
  return text.replace(" ", "-")


def anchors(path):
  """The anchors of a markdown page's headings (duplicates numbered)."""
  text = re.sub(r"^```.*?^```[ \t]*$", "",
                pathlib.Path(path).read_text(encoding="utf-8"),
                flags=re.S | re.M)
  seen = {}
  out = set()
  for heading in re.findall(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", text, re.M):
    base = slug(heading)
    n = seen.get(base, 0)
    seen[base] = n + 1
    out.add(base if n == 0 else f"{base}-{n}")
  return out


def relative_links(path):
  """Targets of the page's links and images that are not URLs."""
  text = _prose(pathlib.Path(path).read_text(encoding="utf-8"))
  targets = re.findall(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text)
  return [t for t in targets
          if not re.match(r"[a-z][a-z0-9+.-]*:", t, re.I)]


def broken_links(path):
  """``(target, why)`` for each relative link of ``path`` that leads nowhere."""
  broken = []
  for target in relative_links(path):
    file_part, _, anchor = target.partition("#")
    dest = (path.parent / file_part).resolve() if file_part else path
    if not dest.exists():
      broken.append((target, "no such file"))
    elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
      broken.append((target, f"no heading #{anchor} in {dest.name}"))
  return broken


@pytest.mark.parametrize("path", pages(), ids=lambda p: p.name)
def test_relative_links_resolve(path):
  assert broken_links(path) == []


def test_link_checker_catches_bad_links(tmp_path):
  (tmp_path / "other.md").write_text("# A heading\n\n## `code` here: yes\n")
  page = tmp_path / "page.md"
  page.write_text(
      "# Top\n\n[ok](other.md) [ok](other.md#a-heading) "
      "[ok](other.md#code-here-yes) [ok](#top) [web](https://x.org/y)\n"
      "`[not a link](missing.md)`\n\n```text\n[nor](missing.md)\n```\n"
      "[bad](missing.md) ![bad](img.png) [bad](other.md#nope) [bad](#nope)\n")
  assert [t for t, _ in broken_links(page)] == [
      "missing.md", "img.png", "other.md#nope", "#nope"]


# --- options ------------------------------------------------------------------


def _public_functions():
  return {name: getattr(galore_jax, name) for name in galore_jax.__all__
          if inspect.isfunction(getattr(galore_jax, name))}


def test_every_option_is_named_in_the_pages():
  """Every parameter of every exported function appears, as a word, in the
  hand-written pages (README and docs/ without the generated api.md)."""
  text = "\n".join(p.read_text(encoding="utf-8")
                   for p in pages() if p != API)
  missing = sorted(
      f"{name}({param})" for name, fn in _public_functions().items()
      for param in inspect.signature(fn).parameters
      if not re.search(rf"\b{re.escape(param)}\b", text))
  assert missing == []


# --- the generated API reference ------------------------------------------------


def _gen_api():
  spec = importlib.util.spec_from_file_location("gen_api", DOCS / "gen_api.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_api_reference_is_up_to_date():
  """Run ``python docs/gen_api.py`` and commit docs/api.md when this fails."""
  assert API.read_text(encoding="utf-8") == _gen_api().render()


def test_api_reference_has_every_name_with_its_signature():
  text = API.read_text(encoding="utf-8")
  for name in galore_jax.__all__:
    assert re.search(rf"^### {name}$", text, re.M), name
    signature = re.search(rf"^```text\n({name}\(.*?)^```", text, re.S | re.M)
    assert signature, name
    for param in inspect.signature(getattr(galore_jax, name)).parameters:
      assert re.search(rf"\b{param}\b", signature.group(1)), (name, param)
