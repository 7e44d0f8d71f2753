"""The operators' review page ``/ui/``: server-rendered HTML, no JavaScript framework, no external CDN."""
