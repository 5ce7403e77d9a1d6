"""The status page: its HTML, CSS and JavaScript, served by mzserver.http."""
