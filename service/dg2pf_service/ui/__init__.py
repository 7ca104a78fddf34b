"""The web dashboard at ``/ui``: jobs, a job's live charts, deployed models, and a submit form.

``routes``: the page shells (Jinja2 templates here), their scripts and styles under ``/ui/static``
(uPlot vendored in ``static/vendor/uplot``), and the one data route the pages need beside the JSON API.
``paths``: which of those paths are served without the token.
"""
