"""The team's ontology: Turtle fragments from the store's ontology log, loaded with rdflib, RDFS
and OWL 2 RL inferences materialised with owlrl, and SPARQL SELECT and ASK answered over the
asserted or the materialised graph. Nothing but the ontology log changes the graph: SPARQL
Update, CONSTRUCT/DESCRIBE, FROM clauses (which would fetch remote graphs) and SERVICE (remote
endpoints) are refused."""
from __future__ import annotations

import threading
from dataclasses import dataclass

import owlrl
from pyparsing import ParseBaseException
from rdflib import Graph
from rdflib.plugins.sparql import prepareQuery
from rdflib.plugins.sparql.parser import parseUpdate
from rdflib.plugins.sparql.parserutils import CompValue
from rdflib.plugins.sparql.sparql import Query
from rdflib.term import Node

from agents.knowledge.types import KnowledgeError

FORMS = {"SelectQuery": "select", "AskQuery": "ask"}


@dataclass(frozen=True)
class OntologyLimits:
    max_turtle_bytes: int = 256 * 1024
    max_triples: int = 5000
    max_rows: int = 1000


def parse_turtle(text: str, name: str) -> Graph:
    graph = Graph()
    try:
        graph.parse(data=text, format="turtle")
    except Exception as exc:  # noqa: BLE001 - rdflib's parsers raise many types for bad input
        detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else exc.__class__.__name__
        raise KnowledgeError(f"{name}: malformed Turtle: {detail}") from None
    return graph


def uses_service(node: object) -> bool:
    if isinstance(node, CompValue):
        return node.name == "ServiceGraphPattern" or any(uses_service(v) for v in node.values())
    if isinstance(node, list | tuple):
        return any(uses_service(v) for v in node)
    return False


def prepared(sparql: str) -> tuple[Query, str]:
    """The parsed query and its form; a clear refusal for anything but SELECT or ASK."""
    try:
        query = prepareQuery(sparql)
    except ParseBaseException as exc:
        if is_update(sparql):
            raise KnowledgeError("SPARQL Update is refused by onto.query: the query path only reads; "
                                 "add triples with onto.assert") from None
        raise KnowledgeError(f"malformed SPARQL: {exc.msg} (line {exc.lineno}, column {exc.col})") from None
    except Exception as exc:  # noqa: BLE001 - rdflib's algebra raises plain exceptions for bad queries
        raise KnowledgeError(f"malformed SPARQL: {exc}") from None
    form = FORMS.get(query.algebra.name)
    if form is None:
        raise KnowledgeError(f"{query.algebra.name}: only SELECT and ASK are answered")
    if query.algebra.get("datasetClause"):
        raise KnowledgeError("FROM / FROM NAMED are refused: queries run over the team's ontology only")
    if uses_service(query.algebra):
        raise KnowledgeError("SERVICE is refused: queries run over the team's ontology only")
    return query, form


def is_update(sparql: str) -> bool:
    try:
        parseUpdate(sparql)
    except Exception:  # noqa: BLE001 - not an update either: the caller reports the query's error
        return False
    return True


def materialised(asserted: Graph) -> Graph:
    graph = Graph()
    for prefix, namespace in asserted.namespaces():
        graph.bind(prefix, namespace)
    for triple in asserted:
        graph.add(triple)
    owlrl.DeductiveClosure(owlrl.RDFS_OWLRL_Semantics, axiomatic_triples=False,
                           datatype_axioms=False).expand(graph)
    return graph


def term_text(node: Node | None) -> str | None:
    return None if node is None else str(node)


class OntologyGraph:
    """The asserted graph of one process, brought up to the store's ontology log before each
    query; the materialised graph is recomputed once per version that is asked to reason."""

    def __init__(self, limits: OntologyLimits | None = None):
        self.limits = limits or OntologyLimits()
        self.asserted = Graph()
        self.version = 0
        self.inferred: Graph | None = None
        self.inferred_version = -1
        self.lock = threading.Lock()

    def load(self, fragments: list[tuple[int, str]]) -> None:
        for version, ntriples in fragments:
            self.asserted.parse(data=ntriples, format="nt")
            self.version = version

    def graph(self, reasoning: bool) -> Graph:
        if not reasoning:
            return self.asserted
        if self.inferred is None or self.inferred_version != self.version:
            self.inferred, self.inferred_version = materialised(self.asserted), self.version
        return self.inferred

    def new_triples(self, graph: Graph) -> int:
        return sum(1 for triple in graph if triple not in self.asserted)

    def answer(self, sparql: str, reasoning: bool) -> tuple[str, tuple[str, ...], tuple, bool | None]:
        query, form = prepared(sparql)
        result = self.graph(reasoning).query(query)
        if form == "ask":
            return form, (), (), bool(result.askAnswer)
        variables = tuple(str(v) for v in result.vars or ())
        rows = []
        for n, row in enumerate(result):
            if n >= self.limits.max_rows:
                break
            rows.append(tuple(term_text(value) for value in row))
        return form, variables, tuple(rows), None
