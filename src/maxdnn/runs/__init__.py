"""Running work in several processes: units of work claimed through a database, with heartbeats and takeover
(``work_units``)."""
