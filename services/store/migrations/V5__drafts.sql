-- Drafts waiting for the user to confirm their mask (never run until confirmed).
CREATE TABLE drafts (
    id              TEXT PRIMARY KEY,
    user_id         INTEGER NOT NULL,
    image_sha256    TEXT NOT NULL REFERENCES blobs(sha256),
    mask_sha256     TEXT NOT NULL REFERENCES blobs(sha256),
    requester_json  TEXT NOT NULL,
    params_json     TEXT NOT NULL,
    created_at      REAL NOT NULL
);
