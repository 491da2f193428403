"""Generated protobuf messages of the OIP gRPC API (see grpc_predict_v2.proto for how to regenerate)."""
