-- Moderation: where a job ran (age-restricted or not), bans, the moderation log.
ALTER TABLE jobs ADD COLUMN age_restricted INTEGER NOT NULL DEFAULT 0;
CREATE INDEX jobs_guild_user ON jobs(guild_id, user_id, created_at);
CREATE TABLE bans (
    guild_id    INTEGER NOT NULL,
    user_id     INTEGER NOT NULL,
    by_user_id  INTEGER,
    reason      TEXT,
    created_at  REAL NOT NULL,
    PRIMARY KEY (guild_id, user_id)
);
CREATE TABLE moderation_log (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    guild_id    INTEGER NOT NULL,
    job_id      INTEGER REFERENCES jobs(id),
    user_id     INTEGER,
    actor_id    INTEGER,
    action      TEXT NOT NULL,
    detail      TEXT NOT NULL DEFAULT '',
    created_at  REAL NOT NULL
);
CREATE INDEX moderation_log_guild ON moderation_log(guild_id, id);
