"""index: documents to chunks to embeddings in chromadb; retrieval with scores."""
