from monitoring.alloy import write_alloy_config

print(write_alloy_config())
