"""The extend stage: new token rows beside a frozen base table."""
