-- The bot-wide daily spending budget (services/spend.py). One row per job holds what the job costs in
-- megapixel-steps (`units`), on the UTC day it was admitted (`day` = unix time // 86400). The row is written in the
-- same write transaction that checks the day's total, just before the job is created, so concurrent admissions
-- can't overshoot; then it is tied to its job (`job_id`). A row not tied to a job yet still counts (a job being
-- created, or a crash in between: counted rather than lost). Jobs that ended without reaching a backend (blocked,
-- or failed / cancelled with no submission) are left out when the day is summed, so they cost nothing.
CREATE TABLE spend (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    day         INTEGER NOT NULL,
    units       REAL NOT NULL CHECK (units >= 0),
    job_id      INTEGER REFERENCES jobs(id) ON DELETE SET NULL,
    guild_id    INTEGER,
    created_at  REAL NOT NULL
);
-- The day's total is one range scan of this index (covering: day, job and units), joined to jobs by primary key.
CREATE INDEX spend_day ON spend(day, job_id, units);
CREATE INDEX spend_job ON spend(job_id);
-- The mod log says a server hit the budget once a day: the first refusal there inserts this row, the rest find it.
CREATE TABLE spend_notices (
    guild_id    INTEGER NOT NULL,
    day         INTEGER NOT NULL,
    created_at  REAL NOT NULL,
    PRIMARY KEY (guild_id, day)
) WITHOUT ROWID;
