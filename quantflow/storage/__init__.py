"""What a stage reads and writes, and who may write it: the artifact store (local or S3),
content hashes and their memo, the manifests that stages hand each other, the checks that
a stored folder is what its manifest says, checkpoint files, stage locks and folder claims."""
