"""Shared knowledge for the agents: a hybrid (BM25 + vector) search store in one SQLite file, an
ontology with RDFS and OWL 2 RL reasoning, a cache keyed by the knowledge version, and change
notices for the agents that subscribe."""
