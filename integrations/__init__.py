"""Integrations of pagedattn with model libraries (installed as ``pagedattn.integrations``)."""
