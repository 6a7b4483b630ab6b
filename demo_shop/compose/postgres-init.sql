-- One database per service, each owned by its own role: a service cannot read another's tables.
-- Run once by the postgres image, on an empty data directory (docker-entrypoint-initdb.d).
CREATE ROLE orders LOGIN PASSWORD 'orders';
CREATE DATABASE orders OWNER orders;

CREATE ROLE customers LOGIN PASSWORD 'customers';
CREATE DATABASE customers OWNER customers;

CREATE ROLE payments LOGIN PASSWORD 'payments';
CREATE DATABASE payments OWNER payments;

-- The trace collector's index of every saga, read by the saga explorer.
CREATE ROLE trace LOGIN PASSWORD 'trace';
CREATE DATABASE trace OWNER trace;
