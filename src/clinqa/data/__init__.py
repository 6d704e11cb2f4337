"""Question schema, loaders for the formats users have, and the bundled question sets."""

from clinqa.data.schema import Question, letters

__all__ = ["Question", "letters"]
