// Command dlrhub-go-client uses dlrhub's contract from Go: the code `buf generate` makes from
// protos/ (build/gen/go) and Debian's grpc-go, nothing else. It runs one session against a dlrhub
// server and prints one JSON object per line on stdout: {"step": ..., "response": ...} with the
// response in ProtoJSON (proto field names), or {"step": ..., "error": ...} with the status's
// details decoded. It exits non-zero on anything unexpected. tests/test_go_client.py runs it;
// tools/go_client.py builds it.
//
//	dlrhub-go-client ADDRESS REPORTS MALFORMED
//
// The session: open a Stream (its first message is a heartbeat), Ingest REPORTS (a GMS body,
// verbatim), GetMessage the first accepted message with its history, ListMessages by that
// message's reference, read the Stream until it has carried every accepted change and a heartbeat
// after them, then two calls that fail: Ingest MALFORMED (INVALID_ARGUMENT, with an ErrorInfo and
// a BadRequest) and GetMessage of an unknown id (NOT_FOUND). Set DLRHUB_TOKEN to send
// `authorization: Bearer <token>`.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"time"

	protov1 "github.com/golang/protobuf/proto"
	"google.golang.org/genproto/googleapis/rpc/code"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	deliveryreportv1 "dlrhub.io/deliveryreport/v1"
)

const (
	timeout           = 10 * time.Second // every call, and the whole Stream
	heartbeatInterval = 200 * time.Millisecond
	unknownMessageID  = "no-such-message"
)

func main() {
	if len(os.Args) != 4 {
		fmt.Fprintln(os.Stderr, "usage: dlrhub-go-client ADDRESS REPORTS MALFORMED")
		os.Exit(2)
	}
	if err := run(os.Args[1], os.Args[2], os.Args[3]); err != nil {
		fmt.Fprintln(os.Stderr, "dlrhub-go-client:", err)
		os.Exit(1)
	}
}

func run(address, reportsPath, malformedPath string) error {
	reports, err := os.ReadFile(reportsPath)
	if err != nil {
		return err
	}
	malformed, err := os.ReadFile(malformedPath)
	if err != nil {
		return err
	}
	conn, err := grpc.Dial(address, grpc.WithInsecure())
	if err != nil {
		return err
	}
	defer conn.Close()
	client := deliveryreportv1.NewDeliveryReportServiceClient(conn)
	ctx := context.Background()
	if token := os.Getenv("DLRHUB_TOKEN"); token != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
	}
	call, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()

	// The Stream first: every change stored after its first message is sure to arrive.
	stream, err := client.Stream(call, &deliveryreportv1.StreamRequest{
		HeartbeatInterval: durationpb.New(heartbeatInterval),
	})
	if err != nil {
		return err
	}
	opened, err := stream.Recv()
	if err != nil {
		return fmt.Errorf("stream: %w", err)
	}
	if opened.GetHeartbeat() == nil {
		return errors.New("stream: the first message is not a heartbeat")
	}
	emit("stream", opened)

	ingested, err := client.Ingest(call, &deliveryreportv1.IngestRequest{
		Body:   &deliveryreportv1.IngestRequest_Payload{Payload: string(reports)},
		Format: deliveryreportv1.Format_FORMAT_GMS,
	})
	if err != nil {
		return fmt.Errorf("ingest: %w", err)
	}
	emit("ingest", ingested)
	if ingested.AcceptedCount == 0 {
		return errors.New("ingest: nothing accepted")
	}

	var messageID string
	for _, result := range ingested.Results {
		if result.Outcome == deliveryreportv1.IngestOutcome_INGEST_OUTCOME_ACCEPTED {
			messageID = result.MessageId
			break
		}
	}
	got, err := client.GetMessage(call, &deliveryreportv1.GetMessageRequest{
		MessageId:      messageID,
		IncludeHistory: true,
	})
	if err != nil {
		return fmt.Errorf("get message: %w", err)
	}
	emit("get_message", got)

	listed, err := client.ListMessages(call, &deliveryreportv1.ListMessagesRequest{
		Selector: &deliveryreportv1.ListMessagesRequest_Reference{Reference: got.Messages[0].Reference},
		PageSize: 10,
	})
	if err != nil {
		return fmt.Errorf("list messages: %w", err)
	}
	emit("list_messages", listed)

	// Every accepted change, then a heartbeat covering them.
	changes := int32(0)
	for {
		message, err := stream.Recv()
		if err != nil {
			return fmt.Errorf("stream: %w", err)
		}
		emit("stream", message)
		switch message.Event.(type) {
		case *deliveryreportv1.StreamResponse_Change:
			changes++
		case *deliveryreportv1.StreamResponse_Heartbeat:
			if changes >= ingested.AcceptedCount {
				cancel()
				return failures(ctx, client, string(malformed))
			}
		default:
			return errors.New("stream: a message that is neither a change nor a heartbeat")
		}
	}
}

// failures makes the two calls that must fail, and prints their errors.
func failures(ctx context.Context, client deliveryreportv1.DeliveryReportServiceClient, malformed string) error {
	call, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	_, err := client.Ingest(call, &deliveryreportv1.IngestRequest{
		Body:   &deliveryreportv1.IngestRequest_Payload{Payload: malformed},
		Format: deliveryreportv1.Format_FORMAT_GMS,
	})
	if err := emitError("ingest_error", err); err != nil {
		return err
	}
	_, err = client.GetMessage(call, &deliveryreportv1.GetMessageRequest{MessageId: unknownMessageID})
	return emitError("get_message_error", err)
}

// rpcError is a failed call's google.rpc.Status, its details decoded.
type rpcError struct {
	Code            string            `json:"code"`
	Message         string            `json:"message"`
	Reason          string            `json:"reason"`
	Domain          string            `json:"domain"`
	Metadata        map[string]string `json:"metadata,omitempty"`
	FieldViolations []fieldViolation  `json:"field_violations,omitempty"`
}

type fieldViolation struct {
	Field       string `json:"field"`
	Description string `json:"description"`
	Reason      string `json:"reason,omitempty"`
}

func decode(err error) (*rpcError, error) {
	st, ok := status.FromError(err)
	if !ok || err == nil {
		return nil, fmt.Errorf("expected a gRPC error, got %v", err)
	}
	decoded := &rpcError{Code: code.Code(st.Code()).String(), Message: st.Message()}
	for _, detail := range st.Details() {
		switch detail := detail.(type) {
		case *errdetails.ErrorInfo:
			decoded.Reason, decoded.Domain, decoded.Metadata = detail.Reason, detail.Domain, detail.Metadata
		case *errdetails.BadRequest:
			for _, violation := range detail.FieldViolations {
				decoded.FieldViolations = append(decoded.FieldViolations, fieldViolation{
					Field:       violation.Field,
					Description: violation.Description,
					Reason:      violationReason(violation),
				})
			}
		case error:
			return nil, fmt.Errorf("undecodable status detail: %w", detail)
		}
	}
	return decoded, nil
}

// violationReason is FieldViolation.reason (field 3), which Debian's genproto (2020) predates:
// an older stub keeps a newer field as an unknown field, so it is read from there.
func violationReason(violation *errdetails.BadRequest_FieldViolation) string {
	unknown := protov1.MessageReflect(violation).GetUnknown()
	for len(unknown) > 0 {
		number, kind, n := protowire.ConsumeTag(unknown)
		if n < 0 {
			return ""
		}
		unknown = unknown[n:]
		if number == 3 && kind == protowire.BytesType {
			value, _ := protowire.ConsumeBytes(unknown)
			return string(value)
		}
		n = protowire.ConsumeFieldValue(number, kind, unknown)
		if n < 0 {
			return ""
		}
		unknown = unknown[n:]
	}
	return ""
}

func emit(step string, response proto.Message) {
	encoded, err := protojson.MarshalOptions{UseProtoNames: true}.Marshal(response)
	if err != nil {
		panic(err)
	}
	write(map[string]interface{}{"step": step, "response": json.RawMessage(encoded)})
}

func emitError(step string, err error) error {
	decoded, err := decode(err)
	if err != nil {
		return fmt.Errorf("%s: %w", step, err)
	}
	write(map[string]interface{}{"step": step, "error": decoded})
	return nil
}

func write(line map[string]interface{}) {
	encoded, err := json.Marshal(line)
	if err != nil {
		panic(err)
	}
	fmt.Println(string(encoded))
}
