-- An entity's current value, version and clock, beside its whole state: what a
-- reconciliation answer lists for the entities changed after the client's version,
-- read without the retained history (NULL in rows stored before: the state is read).
ALTER TABLE entities ADD COLUMN current TEXT;
