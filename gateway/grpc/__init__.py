"""The gRPC side: tes.TaskService over the same task store."""
