"""gunicorn settings file of every server the bench starts.

The baselines run `gunicorn --config bench/gunicorn_bench.py ...` (so that gunicorn does not pick up
./gunicorn.conf.py, kwserver's own); kwserver sets the same itself (kwserver/server/gunicorn_config.py).
Only what has no effect on request handling: several masters run at once in a scenario, and the
default control socket path (~/.gunicorn/gunicorn.ctl, gunicorn >= 25) would be shared by all of them.
"""

control_socket_disable = True
