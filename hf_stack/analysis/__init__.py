"""After training, analysis: compare a grown run with from-scratch baselines, and the fair growth-vs-scratch study
that runs both arms under one protocol."""
