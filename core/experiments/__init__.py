"""Reproductions and evaluations; each writes JSON plus a plotly HTML figure next to it."""
