-- A job's cost (denoising steps × images, what the daily step budget counts) stored when the job is created, so
-- quotas are counted from a column instead of parsing every job's input; and "guild settings" named as the
-- product names them: server settings.
ALTER TABLE jobs ADD COLUMN cost INTEGER NOT NULL DEFAULT 0;
-- Jobs written before this migration: their input omits options left at fal's defaults, which were 25 steps and
-- 1 image when they were created. Blocked jobs never count (and may hold input that isn't valid JSON to SQLite,
-- such as NaN from a form, which json_extract refuses before SQLite 3.42).
UPDATE jobs SET cost = COALESCE(json_extract(input_json, '$.num_inference_steps'), 25)
                     * COALESCE(json_extract(input_json, '$.num_images'), 1)
 WHERE status != 'blocked' AND json_valid(input_json);
ALTER TABLE guild_settings RENAME TO server_settings;
