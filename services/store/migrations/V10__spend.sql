-- The bot-wide daily spending budget (services/spend.py), in megapixel-steps.
--
-- `spend` is the ledger: one row per job with what it costs (`units`) on the UTC day it was admitted (`day` =
-- unix time // 86400). The row is written in the same write transaction that checks the day's total, just before
-- the job is created, so concurrent admissions can't overshoot; then it is tied to its job (`job_id`).
-- `spend_days` is each day's running total, so admission reads one row whatever the day's volume. It goes up
-- with each reservation, down when a reservation is given back, and down (the trigger below) when a job ends
-- without ever reaching a backend (blocked, failed or cancelled with no submission, and no submit under way that
-- may have arrived: `submit_key`, V9), in the same transaction as that change of state: such a job costs nothing,
-- whichever code path ended it. A row not tied to a job yet
-- counts (a job being created, or a crash in between: counted rather than lost).
CREATE TABLE spend (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    day         INTEGER NOT NULL,
    units       REAL NOT NULL CHECK (units >= 0),
    job_id      INTEGER REFERENCES jobs(id) ON DELETE SET NULL,
    guild_id    INTEGER,
    created_at  REAL NOT NULL
);
CREATE INDEX spend_day ON spend(day);
CREATE INDEX spend_job ON spend(job_id);
CREATE TABLE spend_days (
    day     INTEGER PRIMARY KEY,
    units   REAL NOT NULL DEFAULT 0
);
-- NB: a migration that rebuilds the jobs table (CREATE new, copy, DROP, RENAME) drops this trigger with it and
-- must create it again (tests/services/test_spend.py notices: an early-ended job would keep counting).
CREATE TRIGGER spend_job_ended_early AFTER UPDATE OF status ON jobs
WHEN NEW.attempts = 0 AND NEW.submit_key IS NULL AND NEW.status IN ('blocked', 'failed', 'cancelled')
     AND OLD.status NOT IN ('blocked', 'failed', 'cancelled')
BEGIN
    UPDATE spend_days
       SET units = units - (SELECT COALESCE(SUM(s.units), 0) FROM spend AS s
                             WHERE s.job_id = NEW.id AND s.day = spend_days.day)
     WHERE day IN (SELECT day FROM spend WHERE job_id = NEW.id);
END;
-- The mod log says a server hit the budget once a day: the first refusal there inserts this row, the rest find it.
CREATE TABLE spend_notices (
    guild_id    INTEGER NOT NULL,
    day         INTEGER NOT NULL,
    created_at  REAL NOT NULL,
    PRIMARY KEY (guild_id, day)
) WITHOUT ROWID;
-- Today's jobs from before this migration (a database upgraded mid-day): their cost from their input, where
-- fal's defaults (square_hd, 25 steps, 1 image) stand for what the input leaves out. Jobs that never reached a
-- backend don't count; input that isn't valid JSON to SQLite (a blocked job's) is skipped.
INSERT INTO spend (day, units, job_id, guild_id, created_at)
SELECT CAST(created_at / 86400 AS INTEGER),
       CASE COALESCE(json_type(input_json, '$.image_size'), 'null')
           WHEN 'object' THEN json_extract(input_json, '$.image_size.width')
                              * json_extract(input_json, '$.image_size.height')
           WHEN 'text' THEN CASE json_extract(input_json, '$.image_size')
                                WHEN 'square' THEN 512 * 512
                                WHEN 'portrait_4_3' THEN 768 * 1024
                                WHEN 'portrait_16_9' THEN 576 * 1024
                                WHEN 'landscape_4_3' THEN 1024 * 768
                                WHEN 'landscape_16_9' THEN 1024 * 576
                                ELSE 1024 * 1024 END
           ELSE 1024 * 1024 END / 1000000.0
       * COALESCE(json_extract(input_json, '$.num_inference_steps'), 25)
       * COALESCE(json_extract(input_json, '$.num_images'), 1),
       id, guild_id, created_at
  FROM jobs
 WHERE created_at >= CAST(strftime('%s', 'now') AS INTEGER) / 86400 * 86400
   AND json_valid(input_json)
   AND NOT (status IN ('blocked', 'failed', 'cancelled') AND attempts = 0 AND submit_key IS NULL);
INSERT INTO spend_days (day, units) SELECT day, SUM(units) FROM spend GROUP BY day;
