"""The saga explorer: `choreo ui`, a web page over the trace store and the services' own tables.

Needs the `ui` extra (`pip install 'choreo[ui]'`): FastAPI, uvicorn and Jinja2.
"""

from choreo.explorer.app import create_app

__all__ = ["create_app"]
