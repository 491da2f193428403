"""The controller's database: models, unit of work, migrations control, leader lock."""
from .session import Database

__all__ = ["Database"]
