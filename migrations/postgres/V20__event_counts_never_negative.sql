-- Version 20: a use's cost and its price in credits are never negative. A negative one would
-- read as room (a budget rebuilt from its uses, a credit balance replayed from them), so the
-- database refuses to store one; a database already holding one fails this migration loudly.
ALTER TABLE events ADD CONSTRAINT events_cost_never_negative CHECK (cost_micros >= 0);
ALTER TABLE events ADD CONSTRAINT events_credits_never_negative CHECK (credits >= 0);
