"""A stand-in for the Portico booking page: shows a visitor's cart live, and changes it the way
the PHP backend does (write PostgreSQL, then publish the trigger)."""
