-- A renewed runner keeps the serial of the certificate it renewed from until
-- it connects with the new one: the answer carrying the new certificate may
-- be lost, and the runner must still get in to ask again.
ALTER TABLE runners ADD COLUMN previous_cert_serial text;
