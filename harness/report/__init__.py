"""From records to a report: the summary, the analysis, figures and HTML."""
