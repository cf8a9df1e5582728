"""Ordering and selecting stages of a pipeline's dependency graph."""

from __future__ import annotations

from collections.abc import Iterable, Mapping


def find_cycle(needs: Mapping[str, Iterable[str]]) -> list[str] | None:
    """A dependency cycle as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in needs.get(node, ()):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in needs:
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def topological_order(needs: Mapping[str, Iterable[str]]) -> list[str]:
    """Stages with every dependency before its dependents; ties keep the file's order."""
    order: list[str] = []
    done: set[str] = set()

    def visit(node: str) -> None:
        if node in done:
            return
        done.add(node)
        for dep in needs[node]:
            visit(dep)
        order.append(node)

    for node in needs:
        visit(node)
    return order


def ancestors(needs: Mapping[str, Iterable[str]], node: str) -> set[str]:
    found: set[str] = set()
    todo = list(needs[node])
    while todo:
        dep = todo.pop()
        if dep not in found:
            found.add(dep)
            todo.extend(needs[dep])
    return found


def descendants(needs: Mapping[str, Iterable[str]], node: str) -> set[str]:
    children: dict[str, set[str]] = {name: set() for name in needs}
    for name, deps in needs.items():
        for dep in deps:
            children[dep].add(name)
    return ancestors(children, node)
