"""A minimal DOM for asserting on the explorer's pages (stdlib html.parser).

``parse(text).find(id="payouts")``, ``.find_all("span", class_="payout")``,
``.attrs["data-wei"]``, ``.text``. Strict enough for tests: unclosed
elements (other than void ones) fail the parse, so broken markup is caught.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser

_VOID = {"br", "hr", "img", "input", "link", "meta"}


@dataclass
class Node:
    tag: str
    attrs: dict[str, str] = field(default_factory=dict)
    children: list[Node | str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text for c in self.children)

    @property
    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    def walk(self) -> Iterator[Node]:
        for child in self.children:
            if isinstance(child, Node):
                yield child
                yield from child.walk()

    def find_all(
        self, tag: str | None = None, *, class_: str | None = None, **attrs: str
    ) -> list[Node]:
        wanted = {k.rstrip("_").replace("_", "-"): v for k, v in attrs.items()}
        return [
            n
            for n in self.walk()
            if (tag is None or n.tag == tag)
            and (class_ is None or class_ in n.classes)
            and all(n.attrs.get(k) == v for k, v in wanted.items())
        ]

    def find(self, tag: str | None = None, *, class_: str | None = None, **attrs: str) -> Node:
        found = self.find_all(tag, class_=class_, **attrs)
        if len(found) != 1:
            raise AssertionError(
                f"expected one {tag or '*'} {class_ or ''} {attrs}, got {len(found)}"
            )
        return found[0]

    def links(self) -> list[str]:
        return [n.attrs["href"] for n in self.find_all("a") if "href" in n.attrs]

    def rows(self, table_id: str) -> list[list[Node]]:
        """The body rows of table ``table_id``, as lists of cells."""
        body = self.find("table", id=table_id).find("tbody")
        return [[c for c in tr.children if isinstance(c, Node)] for tr in body.find_all("tr")]


class _Builder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document")
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: "" if v is None else v for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in _VOID:
            self.stack.append(node)

    def handle_endtag(self, tag: str) -> None:
        if tag in _VOID:
            return
        top = self.stack.pop()
        if top.tag != tag:
            raise AssertionError(f"</{tag}> closes <{top.tag}>")

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def parse(text: str) -> Node:
    builder = _Builder()
    builder.feed(text)
    builder.close()
    if len(builder.stack) != 1:
        raise AssertionError(f"unclosed elements: {[n.tag for n in builder.stack[1:]]}")
    return builder.root


def wei_of(node: Node) -> int:
    """The exact amount of a ``wei`` span (or of the one inside ``node``)."""
    if "data-wei" in node.attrs:
        return int(node.attrs["data-wei"])
    return int(node.find("span", class_="wei").attrs["data-wei"])
